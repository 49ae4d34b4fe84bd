"""The shop flow through a Python client generated from proto/ with grpcio-tools.

Usage: shop_flow.py AUTH INVENTORY PAYMENTS ORDERS  (host:port each), with the
generated modules on PYTHONPATH. Exits non-zero on any failure.
"""

import sys
import uuid

import grpc

from mesh.auth.v1 import auth_pb2, auth_pb2_grpc
from mesh.common.v1 import money_pb2
from mesh.inventory.v1 import inventory_pb2, inventory_pb2_grpc
from mesh.orders.v1 import orders_pb2, orders_pb2_grpc
from mesh.payments.v1 import payments_pb2, payments_pb2_grpc


def main(auth_addr, inventory_addr, payments_addr, orders_addr):
    auth = auth_pb2_grpc.AuthServiceStub(grpc.insecure_channel(auth_addr))
    inventory = inventory_pb2_grpc.InventoryServiceStub(grpc.insecure_channel(inventory_addr))
    payments = payments_pb2_grpc.PaymentsServiceStub(grpc.insecure_channel(payments_addr))
    orders = orders_pb2_grpc.OrdersServiceStub(grpc.insecure_channel(orders_addr))

    name = "py" + uuid.uuid4().hex[:8]
    auth.Register(auth_pb2.RegisterRequest(username=name, password="python-password"), timeout=10)
    login = auth.Login(auth_pb2.LoginRequest(username=name, password="python-password"), timeout=10)
    token = login.access_token
    md = [("authorization", "Bearer " + token)]

    usd = lambda n: money_pb2.Money(currency_code="USD", amount_minor=n)
    product = inventory.CreateProduct(
        inventory_pb2.CreateProductRequest(sku="PY-" + name, name="Python mug", price=usd(700), initial_stock=4),
        timeout=10,
    )
    account = payments.OpenAccount(payments_pb2.OpenAccountRequest(owner_id=login.user_id, currency_code="USD"), timeout=10)
    payments.Deposit(
        payments_pb2.DepositRequest(account_id=account.account_id, amount=usd(2000), idempotency_key="py-dep"),
        timeout=10,
    )

    order = orders.PlaceOrder(
        orders_pb2.PlaceOrderRequest(
            items=[orders_pb2.PlaceOrderItem(product_id=product.product_id, quantity=2)],
            payment_account_id=account.account_id,
            idempotency_key="py-order",
        ),
        metadata=md,
        timeout=10,
    )
    last = None
    for update in orders.WatchOrder(orders_pb2.WatchOrderRequest(order_id=order.order_id), metadata=md, timeout=30):
        last = update
    assert last is not None and last.status == orders_pb2.ORDER_STATUS_CONFIRMED, last

    balance = payments.GetAccount(payments_pb2.GetAccountRequest(account_id=account.account_id), timeout=10).balance
    assert balance.amount_minor == 600, balance
    stock = inventory.GetProduct(inventory_pb2.GetProductRequest(product_id=product.product_id), timeout=10)
    assert (stock.available, stock.committed) == (2, 2), stock

    try:
        orders.GetOrder(orders_pb2.GetOrderRequest(order_id="nope"), metadata=md, timeout=10)
        raise AssertionError("a malformed id was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "order_id" in err.details(), err.details()

    print("python shop flow: order", last.order_id, "CONFIRMED")


if __name__ == "__main__":
    main(*sys.argv[1:5])
