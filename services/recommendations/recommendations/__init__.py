"""The shop's recommendations service, in Python: products bought together,
learned from confirmed orders, served over the mesh's wire contract
(docs/joining-the-mesh.md) like the Rust services."""
