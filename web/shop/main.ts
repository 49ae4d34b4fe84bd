// The storefront: every call goes to the gateway with gRPC-Web through the
// client generated from proto/ (src/gen, `npm run generate`).
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AuthService } from "../src/gen/mesh/auth/v1/auth_pb";
import { InventoryService, type Product } from "../src/gen/mesh/inventory/v1/inventory_pb";
import { OrdersService, OrderStatus, type Order } from "../src/gen/mesh/orders/v1/orders_pb";
import { WalletService, type Account } from "../src/gen/mesh/payments/v1/payments_pb";
import type { Money } from "../src/gen/mesh/common/v1/money_pb";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

/** The signed-in user, in memory only: a reload signs out. */
let session: { username: string; token: string } | undefined;
let accounts: Account[] = [];
let selectedAccount: string | undefined;
/** Orders on the page, newest first, with the watch that keeps each live. */
const orders = new Map<string, { order: Order; watch?: AbortController }>();
/** Product names by id, for the order list. */
const productNames = new Map<string, string>();

const withToken: Interceptor = (next) => (req) => {
  if (session) req.header.set("authorization", `Bearer ${session.token}`);
  return next(req);
};

const config: { gatewayUrl: string } = await (await fetch("/config.json")).json();
const transport = createGrpcWebTransport({
  baseUrl: config.gatewayUrl,
  interceptors: [withToken],
});
const auth = createClient(AuthService, transport);
const inventory = createClient(InventoryService, transport);
const ordersClient = createClient(OrdersService, transport);
const wallet = createClient(WalletService, transport);

/** Shows what the server said: its status code and its own message. */
function showError(e: unknown) {
  const box = $("error");
  box.replaceChildren();
  const err = ConnectError.from(e);
  const code = document.createElement("span");
  code.className = "code";
  code.textContent = codeName(err.code);
  const message = document.createElement("span");
  message.className = "message";
  message.textContent = err.rawMessage;
  box.append(code, message);
  box.dataset.code = codeName(err.code);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
}

/** `Code.InvalidArgument` → `INVALID_ARGUMENT`, as gRPC names it. */
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

function money(m: Money | undefined): string {
  if (!m) return "-";
  const minor = m.amountMinor;
  const sign = minor < 0n ? "-" : "";
  const abs = minor < 0n ? -minor : minor;
  return `${sign}${abs / 100n}.${(abs % 100n).toString().padStart(2, "0")} ${m.currencyCode}`;
}

/** Runs `f`, showing its failure; the buttons stay usable either way. */
async function guarded(f: () => Promise<void>) {
  clearError();
  try {
    await f();
  } catch (e) {
    showError(e);
  }
}

function renderSession() {
  const el = $("session");
  el.textContent = session ? `signed in as ${session.username}` : "not signed in";
  el.dataset.state = session ? "in" : "out";
  $("logout").hidden = !session;
  $("wallet-hint").textContent = session
    ? accounts.length
      ? "Orders are paid from the selected account."
      : "Open an account and fund it to pay for orders."
    : "Sign in to open an account.";
}

async function loadProducts() {
  const { products } = await inventory.listProducts({ pageSize: 100 });
  for (const p of products) productNames.set(p.productId, p.name);
  const rows = products.map(productRow);
  $("products").replaceChildren(...rows);
}

function productRow(p: Product): HTMLTableRowElement {
  const tr = document.createElement("tr");
  tr.dataset.productId = p.productId;
  tr.dataset.sku = p.sku;
  const cell = (text: string) => {
    const td = document.createElement("td");
    td.textContent = text;
    return td;
  };
  const qty = document.createElement("input");
  qty.type = "number";
  qty.value = "1";
  qty.className = "quantity";
  qty.setAttribute("aria-label", `quantity of ${p.name}`);
  const buy = document.createElement("button");
  buy.textContent = "Order";
  buy.className = "order";
  buy.addEventListener("click", () => guarded(() => placeOrder(p, qty.value)));
  const qtyCell = document.createElement("td");
  qtyCell.append(qty);
  const buyCell = document.createElement("td");
  buyCell.append(buy);
  tr.append(cell(p.name), cell(money(p.price)), cell(p.available.toString()), qtyCell, buyCell);
  return tr;
}

async function placeOrder(p: Product, quantityText: string) {
  // Only the shape is checked here; the range (1 to 10000) is the server's
  // to enforce and to explain.
  if (!/^-?\d{1,19}$/.test(quantityText.trim())) {
    throw new ConnectError(`quantity: ${JSON.stringify(quantityText)} is not a whole number`, Code.InvalidArgument);
  }
  // Signed out, the call still goes to the server, without a token: the
  // server refuses it, and its refusal is what the page shows.
  const order = await ordersClient.placeOrder({
    items: [{ productId: p.productId, quantity: BigInt(quantityText.trim()) }],
    paymentAccountId: selectedAccount ?? "",
    idempotencyKey: crypto.randomUUID(),
  });
  upsertOrder(order);
  watch(order.orderId);
}

function statusName(s: OrderStatus): string {
  return OrderStatus[s] ?? String(s);
}

function upsertOrder(order: Order) {
  const entry = orders.get(order.orderId);
  if (entry) entry.order = order;
  else orders.set(order.orderId, { order });
  renderOrders();
}

function renderOrders() {
  const sorted = [...orders.values()].sort((a, b) =>
    Number((b.order.createdAt?.seconds ?? 0n) - (a.order.createdAt?.seconds ?? 0n)),
  );
  $("orders").replaceChildren(
    ...sorted.map(({ order }) => {
      const li = document.createElement("li");
      li.dataset.orderId = order.orderId;
      const status = document.createElement("span");
      status.className = "status";
      status.dataset.status = statusName(order.status);
      status.textContent = statusName(order.status);
      const items = order.items
        .map((i) => `${i.quantity} × ${productNames.get(i.productId) ?? i.productId.slice(0, 8)}`)
        .join(", ");
      const detail = document.createElement("span");
      const step = order.status === OrderStatus.PENDING && order.sagaStep ? ` (${order.sagaStep})` : "";
      const reason = order.cancelReason ? `: ${order.cancelReason}` : "";
      detail.textContent = ` ${money(order.total)}, ${items}${step}${reason}`;
      li.append(status, detail);
      return li;
    }),
  );
}

/** Follows an order's changes live over WatchOrder (server streaming
 *  over gRPC-Web) until it is final; a broken stream is watched again,
 *  a few times, a second apart. */
async function watch(orderId: string) {
  const entry = orders.get(orderId);
  if (!entry || entry.watch) return;
  const abort = new AbortController();
  entry.watch = abort;
  for (let attempt = 0; attempt < 5 && !abort.signal.aborted; attempt++) {
    try {
      for await (const order of ordersClient.watchOrder({ orderId }, { signal: abort.signal })) {
        upsertOrder(order);
        if (order.status === OrderStatus.CONFIRMED || order.status === OrderStatus.CANCELLED) {
          await Promise.all([refreshAccounts(), loadProducts()]);
          return;
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
      const err = ConnectError.from(e);
      if (err.code !== Code.Unavailable && err.code !== Code.DeadlineExceeded) {
        showError(err);
        return;
      }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function refreshAccounts() {
  if (!session) return;
  ({ accounts } = await wallet.listAccounts({ pageSize: 10 }));
  if (!accounts.some((a) => a.accountId === selectedAccount)) {
    selectedAccount = accounts[0]?.accountId;
  }
  $("accounts").replaceChildren(
    ...accounts.map((a) => {
      const li = document.createElement("li");
      li.dataset.accountId = a.accountId;
      li.className = a.accountId === selectedAccount ? "selected" : "";
      const pick = document.createElement("button");
      pick.type = "button";
      pick.textContent = a.accountId === selectedAccount ? "paying" : "pay with this";
      pick.addEventListener("click", () => {
        selectedAccount = a.accountId;
        void refreshAccounts();
      });
      const balance = document.createElement("span");
      balance.className = "balance";
      balance.textContent = money(a.balance);
      li.append(balance, document.createTextNode(` account ${a.accountId.slice(0, 8)} `), pick);
      return li;
    }),
  );
  renderSession();
}

async function signIn(username: string, password: string) {
  const reply = await auth.login({ username, password });
  session = { username, token: reply.accessToken };
  renderSession();
  await refreshAccounts();
  const { orders: mine } = await ordersClient.listOrders({ pageSize: 20 });
  for (const order of mine) upsertOrder(order);
  for (const order of mine) {
    if (order.status === OrderStatus.PENDING) void watch(order.orderId);
  }
}

function signOut() {
  for (const { watch } of orders.values()) watch?.abort();
  session = undefined;
  accounts = [];
  selectedAccount = undefined;
  orders.clear();
  $("accounts").replaceChildren();
  renderOrders();
  renderSession();
}

const credentials = () => ({
  username: $<HTMLInputElement>("username").value.trim(),
  password: $<HTMLInputElement>("password").value,
});

$("register").addEventListener("click", () =>
  guarded(async () => {
    const { username, password } = credentials();
    await auth.register({ username, password });
    await signIn(username, password);
  }),
);
$("auth-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  void guarded(async () => {
    const { username, password } = credentials();
    await signIn(username, password);
  });
});
$("logout").addEventListener("click", signOut);
$("open-account").addEventListener("click", () =>
  guarded(async () => {
    const account = await wallet.openAccount({ currencyCode: "USD" });
    selectedAccount = account.accountId;
    await refreshAccounts();
  }),
);
$("deposit-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  void guarded(async () => {
    const text = $<HTMLInputElement>("deposit-amount").value.trim();
    if (!/^\d{1,13}(\.\d{1,2})?$/.test(text)) {
      throw new ConnectError(`amount: ${JSON.stringify(text)} is not an amount like 12.50`, Code.InvalidArgument);
    }
    const [whole, cents = ""] = text.split(".");
    await wallet.deposit({
      accountId: selectedAccount ?? "",
      amount: { currencyCode: "USD", amountMinor: BigInt(whole) * 100n + BigInt(cents.padEnd(2, "0")) },
      idempotencyKey: crypto.randomUUID(),
    });
    await refreshAccounts();
  });
});
$("refresh-products").addEventListener("click", () => guarded(loadProducts));

renderSession();
await guarded(loadProducts);
document.body.dataset.ready = "true";
