-- PlaceOrder counts a user's PENDING orders (the per-user cap) on every call.
CREATE INDEX orders_by_user_status ON orders (user_id, status);
