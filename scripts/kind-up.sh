#!/usr/bin/env bash
# From zero to the shop on a local kind cluster:
#   scripts/kind-up.sh            # cluster, images, certificates, manifests
# Needs docker, kind and kubectl. Re-running rebuilds and reloads the images.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-shop}
SERVICES="auth inventory payments orders gateway identity"

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config k8s/kind-config.yaml
fi

for svc in $SERVICES; do
    docker build --build-arg SERVICE="$svc" -t "mesh-shop/$svc:dev" .
    kind load docker-image --name "$CLUSTER" "mesh-shop/$svc:dev"
done
# The Python service has its own recipe.
docker build -f Dockerfile.recommendations -t mesh-shop/recommendations:dev .
kind load docker-image --name "$CLUSTER" mesh-shop/recommendations:dev

# The one step before `kubectl apply -k`: the identity service's issuing CA
# (created once in .shop/k8s-certs, key 0600, and kept there for rotations)
# as the identity-ca Secret, and its certificate as the mesh-trust-bundle
# ConfigMap every workload trusts. No workload certificate or key is made
# here: each pod gets its own from the identity service, key in memory. The
# operator's all-access certificate stays out of the cluster
# (`shopctl certs --out .shop/k8s-certs --operator` issues one locally,
# valid for an hour).
cargo run --quiet -p shopctl -- certs --out .shop/k8s-certs --k8s-identity-ca | kubectl apply -f -

kubectl apply -k k8s/overlays/kind
kubectl -n shop rollout status statefulset/postgres --timeout=180s
for svc in $SERVICES recommendations; do
    kubectl -n shop rollout status "deployment/$svc" --timeout=180s
done
echo "The shop runs in namespace shop; its gateway answers on 127.0.0.1:50055."
echo "Operator certificate (1 h): cargo run -p shopctl -- certs --out .shop/k8s-certs --operator"
