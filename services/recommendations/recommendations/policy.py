"""The mesh config's `authorization` section, enforced as mesh-client does
(crates/mesh-client/src/authz.rs): deny by default once a policy exists;
callers are exact SPIFFE IDs, prefixes ending in `/*` at a path segment,
or `*`; methods are `package.Service/Method`, `package.Service/Prefix*`,
`package.Service/*` or `*`; `grpc.health.v1.Health`
is always allowed. The file is re-read every 2 s; a change that does not
validate is logged and counted (`mesh_config_reloads_total{outcome="refused"}`)
and the last good policy stays.
"""

import json
import logging
import os
import threading

log = logging.getLogger("recommendations.policy")

HEALTH = "grpc.health.v1.Health/"
# Keys of mesh-client's MeshConfig: the client-side ones mean nothing to a
# server that calls no one, but a file written for the Rust services loads.
KNOWN_KEYS = {
    "defaultTimeout", "maxTimeout", "loadBalancingPolicy", "retryPolicy", "hedgingPolicy",
    "retryBudget", "outlierDetection", "healthChecks", "maxReplayBytes", "dnsRefresh",
    "endpoint", "targets", "authorization",
}


class PolicyError(Exception):
    """A mesh config that does not validate; the message names the field."""


_DOMAIN_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-._")
_SEGMENT_CHARS = _DOMAIN_CHARS | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _spiffe_id_ok(value):
    """A well-formed SPIFFE ID, by mesh-client's rules (tls/identity.rs)."""
    rest = value[len("spiffe://") :] if value.startswith("spiffe://") else None
    if rest is None or "/" not in rest or len(value) > 2048:
        return False
    domain, path = rest.split("/", 1)
    if not domain or not set(domain) <= _DOMAIN_CHARS:
        return False
    return all(seg and seg not in (".", "..") and set(seg) <= _SEGMENT_CHARS for seg in path.split("/"))


def caller_pattern_ok(pattern):
    """`*`, an exact SPIFFE ID, or a spiffe:// prefix ending in `/*` at a
    path segment (authz.rs `caller_pattern_ok`): a prefix cut inside a
    segment matches more than it says (`spiffe://shop.local*` also matches
    the trust domain `shop.local.evil`, `.../sa/orders*` the account
    `orders-admin`)."""
    if pattern == "*":
        return True
    if pattern.endswith("/*"):
        return _spiffe_id_ok(pattern[:-2] + "/x")
    return _spiffe_id_ok(pattern)


def method_pattern_ok(pattern):
    """`*` or `package.Service/Method`, the method part possibly ending in
    `*` (authz.rs `method_pattern_ok`): a `*` anywhere else would be taken
    literally and never match."""
    if pattern == "*":
        return True
    service, slash, method = pattern.partition("/")
    head = method[:-1] if method.endswith("*") else method
    return bool(slash) and bool(service) and bool(method) and "/" not in method and "*" not in service and "*" not in head


def _matches(pattern, value):
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else pattern == value


class Policy:
    """Which callers may call which methods."""

    def __init__(self, mode, rules):
        self.mode = mode
        self.rules = rules

    @staticmethod
    def parse(text):
        """The policy of a mesh config file (None: no `authorization`, so
        no authorization at all, as mesh-client)."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise PolicyError(f"not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise PolicyError("the mesh config must be a JSON object")
        unknown = sorted(set(doc) - KNOWN_KEYS)
        if unknown:
            raise PolicyError(f"{unknown[0]}: unknown field")
        authz = doc.get("authorization")
        if authz is None:
            return None
        if not isinstance(authz, dict) or set(authz) - {"mode", "rules"}:
            raise PolicyError("authorization: must be an object with mode and rules only")
        mode = authz.get("mode", "enforce")
        if mode not in ("enforce", "audit"):
            raise PolicyError(f"authorization.mode: must be enforce or audit, got {mode!r}")
        rules = authz.get("rules")
        if not isinstance(rules, list) or not rules:
            raise PolicyError("authorization.rules: must list at least one rule")
        parsed = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or set(rule) != {"callers", "methods"}:
                raise PolicyError(f"authorization.rules[{i}]: must have callers and methods only")
            callers, methods = rule["callers"], rule["methods"]
            for field, values in (("callers", callers), ("methods", methods)):
                if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                    raise PolicyError(f"authorization.rules[{i}].{field}: must be a non-empty list of strings")
            for j, c in enumerate(callers):
                if not caller_pattern_ok(c):
                    raise PolicyError(
                        f"authorization.rules[{i}].callers[{j}]: must be a SPIFFE ID, a spiffe:// prefix ending in /* (whole path segments), or *"
                    )
            for j, m in enumerate(methods):
                if not method_pattern_ok(m):
                    raise PolicyError(
                        f"authorization.rules[{i}].methods[{j}]: must be package.Service/Method, package.Service/MethodPrefix*, package.Service/* or * (a * only at the end)"
                    )
            parsed.append((list(callers), list(methods)))
        return Policy(mode, parsed)

    def allows(self, caller, method):
        """Whether `caller` (a SPIFFE ID or None) may call `method` (`package.Service/Method`)."""
        if method.startswith(HEALTH):
            return True
        if caller is None:
            return False
        return any(
            any(_matches(p, caller) for p in callers) and any(_matches(p, method) for p in methods)
            for callers, methods in self.rules
        )


class PolicyFile:
    """The policy of `--mesh-config`, watched for changes."""

    def __init__(self, path, metrics):
        self.path = path
        self.metrics = metrics
        self.policy = None
        self._stamp = None
        if path:
            self._stamp = os.stat(path).st_mtime_ns
            with open(path, encoding="utf-8") as f:
                self.policy = Policy.parse(f.read())

    def watch(self, stop):
        """Re-reads the file every 2 s until `stop` (a threading.Event) is set."""
        while self.path and not stop.wait(2.0):
            try:
                stamp = os.stat(self.path).st_mtime_ns
                if stamp == self._stamp:
                    continue
                self._stamp = stamp
                with open(self.path, encoding="utf-8") as f:
                    policy = Policy.parse(f.read())
            except (OSError, PolicyError) as e:
                log.error("mesh config %s refused, the last good policy stays: %s", self.path, e)
                self.metrics.config_reloads.labels(outcome="refused").inc()
                continue
            weaker = policy is None or policy.mode == "audit"
            if self.policy is not None and self.policy.mode == "enforce" and weaker:
                # As mesh-client: a reload cannot turn enforcement off or
                # into audit; that takes a restart, not a file edit.
                log.error("mesh config %s would stop enforcing authorization; refused", self.path)
                self.metrics.config_reloads.labels(outcome="refused").inc()
                continue
            self.policy = policy
            self.metrics.config_reloads.labels(outcome="applied").inc()
            log.info("mesh config %s applied", self.path)

    def start(self):
        stop = threading.Event()
        threading.Thread(target=self.watch, args=(stop,), daemon=True, name="policy-watch").start()
        return stop
