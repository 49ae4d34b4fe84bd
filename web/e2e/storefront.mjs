// The storefront end to end in a real browser, against a running shop:
// signed out, ordering is refused by the server; a user registers, opens
// and funds an account, a bad quantity shows the server's own message,
// and an order reaches CONFIRMED on the page, live, without a reload.
// Env: STOREFRONT_URL, SHOP_USER, SHOP_SKU, SCREENSHOT (a .png path).
import { check, run, withPage } from "./browser.mjs";

const url = process.env.STOREFRONT_URL;
const user = process.env.SHOP_USER;
const sku = process.env.SHOP_SKU;

run(() =>
  withPage(async (page, problems) => {
    await page.goto(url);
    await page.waitForSelector("body[data-ready=true]");
    // A marker in the page's own memory: gone if the page ever reloads.
    await page.evaluate(() => (window.__loadedOnce = true));
    const row = page.locator(`tr[data-sku="${sku}"]`);
    await row.waitFor();

    // Signed out: the server refuses the order, and says why.
    await row.locator("button.order").click();
    const error = page.locator("#error");
    await error.waitFor({ state: "visible" });
    const refused = await error.getAttribute("data-code");
    check(refused === "UNAUTHENTICATED", `signed out, the order was answered ${refused}: ${await error.textContent()}`);
    check((await page.locator("#orders li").count()) === 0, "signed out, an order appeared");
    const refusal = await error.locator(".message").textContent();

    // Register (which signs in), open an account and fund it.
    await page.fill("#username", user);
    await page.fill("#password", "correct-horse-battery");
    await page.click("#register");
    await page.waitForSelector("#session[data-state=in]");
    await page.click("#open-account");
    await page.waitForSelector("#accounts li");
    await page.fill("#deposit-amount", "50.00");
    await page.click("#deposit");
    await page.waitForFunction(() => document.querySelector("#accounts .balance")?.textContent === "50.00 USD");

    // A quantity out of range: the server's message, as it is.
    await row.locator("input.quantity").fill("20000");
    await row.locator("button.order").click();
    await page.waitForFunction(() => document.querySelector("#error .message")?.textContent?.includes("quantity"));
    const badQuantity = await error.locator(".message").textContent();
    check(
      badQuantity === "items[0].quantity: must be 1 to 10000, got 20000",
      `a bad quantity showed ${JSON.stringify(badQuantity)}`,
    );
    check((await error.getAttribute("data-code")) === "INVALID_ARGUMENT", "a bad quantity is INVALID_ARGUMENT");
    check((await page.locator("#orders li").count()) === 0, "a refused order appeared");

    // A good order: PENDING at once, then CONFIRMED by the saga, pushed
    // to the page over WatchOrder.
    // Every status the page shows for it is recorded as the DOM changes.
    await page.evaluate(() => {
      window.__statuses = [];
      new MutationObserver(() => {
        const s = document.querySelector("#orders li .status")?.textContent;
        if (s && window.__statuses.at(-1) !== s) window.__statuses.push(s);
      }).observe(document.querySelector("#orders"), { childList: true, subtree: true, characterData: true });
    });
    await row.locator("input.quantity").fill("2");
    await row.locator("button.order").click();
    await page.waitForSelector('#orders li .status[data-status="CONFIRMED"]', { timeout: 120_000 });
    const seen = await page.evaluate(() => window.__statuses);
    check(
      seen[0] === "PENDING" && seen.at(-1) === "CONFIRMED",
      `the order's statuses on the page were ${JSON.stringify(seen)}, not PENDING then CONFIRMED`,
    );
    check(await error.isHidden(), `an error is shown after the order: ${await error.textContent()}`);
    check(await page.evaluate(() => window.__loadedOnce === true), "the page reloaded");
    // 50.00 - 2 × 12.50, once the charge shows.
    await page.waitForFunction(() => document.querySelector("#accounts .balance")?.textContent === "25.00 USD");
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    check(problems.length === 0, `the page had problems:\n${problems.join("\n")}`);
    // CORS stays strict: a page of any other origin cannot call the
    // gateway (the browser refuses once the preflight allows no origin).
    const gatewayUrl = await page.evaluate(async () => (await (await fetch("/config.json")).json()).gatewayUrl);
    await page.goto("data:text/html,<p>elsewhere</p>");
    const foreign = await page.evaluate(async (gw) => {
      try {
        const r = await fetch(`${gw}/mesh.inventory.v1.InventoryService/ListProducts`, {
          method: "POST",
          headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
          body: new Uint8Array([0, 0, 0, 0, 0]),
        });
        return `answered ${r.status}`;
      } catch (e) {
        return `refused: ${e}`;
      }
    }, gatewayUrl);
    check(foreign.startsWith("refused"), `a page of another origin called the gateway: ${foreign}`);
    console.log(JSON.stringify({ refusal, badQuantity, statuses: seen, foreign }));
  }),
);
