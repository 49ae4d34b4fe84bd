//! Subsetting: which endpoints of a large target one client connects to.
//!
//! Two orders, both computed by each client alone from its id and the
//! resolved addresses (no coordination, no state carried between updates):
//!
//! - **Rendezvous** (gRFC A68): every address gets the score
//!   `hash(seed, address)`; a client prefers the lowest scores. Adding or
//!   removing one endpoint changes only the subsets that contain it, by
//!   one member each: the least churn possible. The price is evenness:
//!   the clients per server are binomial (C × size / N ± its square root),
//!   so at 1,000 × 1,000 with size 16 the busiest server has ~1.8× the
//!   mean connections.
//! - **Deterministic** (the SRE book's, changed in two places): clients
//!   with dense ordinals are grouped in rounds of `ceil(N / size)`; each
//!   round orders the endpoints by a per-round hash and hands each client
//!   of the round its own slice of `size`, so every endpoint gets one
//!   client per round (the ≤ size−1 endpoints of the middle overlap get
//!   two). The book shuffles a list of indices, so one removed endpoint
//!   reshuffles every subset; ordering by a hash of the address instead
//!   moves every later endpoint by one rank only, and anchoring the first
//!   half of the slices at the front and the second half at the back
//!   limits that to the slices between the removed rank and its end:
//!   a quarter of the clients on average, each changing one member
//!   (1/(4 × size) of all members; 1.6 % at size 16). When N crosses a
//!   multiple of `size` the number of slices per round changes and every
//!   subset is dealt anew, as in the book.
//!
//! Both give a preference order beyond `size`, which is how a subset is
//! widened when members fail (see `EndpointSet::widen`).

use std::net::{IpAddr, SocketAddr};

use crate::config::{SubsetConfig, SubsetMode, client_ordinal};

/// How one client orders a target's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Lowest `hash(seed, address)` first.
    Rendezvous { seed: u64 },
    /// The client's slice of its round first, then the following ranks.
    Deterministic { ordinal: u64 },
}

/// A target's subsetting as a client applies it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Subset {
    pub(crate) order: Order,
    /// Members wanted (the configured size).
    pub(crate) size: usize,
    /// Widen when more than this share of members is unusable.
    pub(crate) max_unhealthy: f64,
    /// Members at most while widened (`maxWidth`; default 2 × size).
    pub(crate) max_width: usize,
}

impl Subset {
    /// The subsetting `config` asks for (validated, so a deterministic
    /// config has an ordinal).
    pub(crate) fn new(config: &SubsetConfig) -> Self {
        let order = match config.mode {
            SubsetMode::Deterministic => Order::Deterministic {
                ordinal: config
                    .client_id
                    .as_deref()
                    .and_then(client_ordinal)
                    .unwrap_or(0),
            },
            SubsetMode::Rendezvous => Order::Rendezvous {
                seed: match &config.client_id {
                    Some(id) => hash_str(id),
                    None => rand::random(),
                },
            },
        };
        Self {
            order,
            size: config.size,
            max_unhealthy: f64::from(config.max_unhealthy_percent) / 100.0,
            max_width: config.max_width.unwrap_or(2 * config.size).max(config.size),
        }
    }

    /// The least number of usable members before the subset is widened.
    pub(crate) fn needed(&self) -> usize {
        let allowed = (self.size as f64 * self.max_unhealthy).floor() as usize;
        self.size.saturating_sub(allowed).max(1)
    }

    /// The first `want` endpoints of `addrs` in this client's order (all
    /// of them when there are fewer). O(N) for rendezvous, O(N log N) for
    /// deterministic; run on endpoint-set updates, never per call.
    pub(crate) fn preference(&self, addrs: &[SocketAddr], want: usize) -> Vec<SocketAddr> {
        preference(&self.order, self.size, addrs, want)
    }
}

/// The first `want` of `addrs` in `order`, for slices of `size`.
pub(crate) fn preference(
    order: &Order,
    size: usize,
    addrs: &[SocketAddr],
    want: usize,
) -> Vec<SocketAddr> {
    let n = addrs.len();
    let want = want.min(n);
    if want == 0 {
        return Vec::new();
    }
    match *order {
        Order::Rendezvous { seed } => {
            let mut scored: Vec<(u64, SocketAddr)> =
                addrs.iter().map(|a| (score(seed, a), *a)).collect();
            if want < n {
                scored.select_nth_unstable(want - 1);
                scored.truncate(want);
            }
            scored.sort_unstable();
            scored.into_iter().map(|(_, a)| a).collect()
        }
        Order::Deterministic { ordinal } => {
            let size = size.clamp(1, n);
            let slices = n.div_ceil(size) as u64;
            let round = ordinal / slices;
            let slice = (ordinal % slices) as usize;
            let seed = mix(round ^ 0x5eed_0f5a_b5e7);
            let mut ranked: Vec<(u64, SocketAddr)> =
                addrs.iter().map(|a| (score(seed, a), *a)).collect();
            ranked.sort_unstable();
            let slices = slices as usize;
            let front = slices.div_ceil(2);
            let start = if slice < front {
                slice * size
            } else {
                n - (slices - slice) * size
            };
            (0..want).map(|i| ranked[(start + i) % n].1).collect()
        }
    }
}

/// A stable 64-bit mix (splitmix64's finaliser): clients built from
/// different Rust versions must agree, so not `std`'s hasher.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn score(seed: u64, addr: &SocketAddr) -> u64 {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            mix(bits as u64) ^ ((bits >> 64) as u64)
        }
    };
    mix(seed ^ mix(ip.rotate_left(16) ^ u64::from(addr.port())))
}

/// FNV-1a of a client id, mixed.
fn hash_str(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h)
}

/// The members `config` gives a client of a target with these addresses
/// (for the simulator and benchmarks; a channel uses the same function).
#[doc(hidden)]
pub fn subset_members(config: &SubsetConfig, addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    Subset::new(config).preference(addrs, config.size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::collections::{HashMap, HashSet};

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 8080)))
            .collect()
    }

    fn config(mode: SubsetMode, id: &str, size: usize) -> SubsetConfig {
        SubsetConfig {
            size,
            client_id: Some(id.to_owned()),
            mode,
            max_unhealthy_percent: 25,
            max_width: None,
        }
    }

    /// Clients per endpoint over `clients` clients: (max / mean, min).
    fn spread(
        mode: SubsetMode,
        clients: usize,
        servers: &[SocketAddr],
        size: usize,
    ) -> (f64, usize) {
        let mut count: HashMap<SocketAddr, usize> = servers.iter().map(|a| (*a, 0)).collect();
        for c in 0..clients {
            for m in subset_members(&config(mode, &format!("client-{c}"), size), servers) {
                *count.get_mut(&m).unwrap() += 1;
            }
        }
        let mean = (clients * size) as f64 / servers.len() as f64;
        let max = *count.values().max().unwrap();
        (max as f64 / mean, *count.values().min().unwrap())
    }

    /// Members changed (out of clients × size) when `change` edits the set.
    fn moved(
        mode: SubsetMode,
        clients: usize,
        before: &[SocketAddr],
        after: &[SocketAddr],
        size: usize,
    ) -> f64 {
        let mut changed = 0;
        for c in 0..clients {
            let cfg = config(mode, &format!("client-{c}"), size);
            let a: HashSet<_> = subset_members(&cfg, before).into_iter().collect();
            let b: HashSet<_> = subset_members(&cfg, after).into_iter().collect();
            changed += a.difference(&b).count();
        }
        changed as f64 / (clients * size) as f64
    }

    #[test]
    fn a_subset_has_its_size_distinct_members_of_the_set_or_all_of_a_smaller_set() {
        let mut rng = StdRng::seed_from_u64(21);
        for _ in 0..200 {
            let n = rng.random_range(0..300);
            let size = rng.random_range(1..40);
            let set = addrs(n);
            let id = format!("c-{}", rng.random_range(0..10_000));
            for mode in [SubsetMode::Rendezvous, SubsetMode::Deterministic] {
                let members = subset_members(&config(mode, &id, size), &set);
                assert_eq!(members.len(), size.min(n), "{mode:?} n={n} size={size}");
                let distinct: HashSet<_> = members.iter().collect();
                assert_eq!(distinct.len(), members.len(), "{mode:?}: no duplicates");
                assert!(members.iter().all(|m| set.contains(m)));
                // The order of the resolver's list does not matter.
                let mut shuffled = set.clone();
                shuffled.reverse();
                let again = subset_members(&config(mode, &id, size), &shuffled);
                assert_eq!(
                    members.iter().collect::<HashSet<_>>(),
                    again.iter().collect::<HashSet<_>>()
                );
            }
        }
    }

    #[test]
    fn deterministic_subsets_cover_every_endpoint_evenly() {
        // 1,000 clients × 1,000 endpoints, size 16: 63 slices per round,
        // 15.9 rounds; every endpoint gets 15 to 17 clients.
        let servers = addrs(1000);
        let (ratio, min) = spread(SubsetMode::Deterministic, 1000, &servers, 16);
        assert!(ratio <= 1.13, "max/mean {ratio}");
        assert!(min >= 14, "min {min}");
        // 4 clients × 8 of 40: 32 distinct endpoints, none shared.
        let servers = addrs(40);
        let mut seen = HashSet::new();
        for c in 0..4 {
            for m in subset_members(
                &config(SubsetMode::Deterministic, &format!("w-{c}"), 8),
                &servers,
            ) {
                assert!(seen.insert(m), "{m} is in two subsets");
            }
        }
        assert_eq!(seen.len(), 32);
    }

    #[test]
    fn rendezvous_subsets_spread_binomially() {
        let servers = addrs(1000);
        let (ratio, _) = spread(SubsetMode::Rendezvous, 1000, &servers, 16);
        // Binomial(1000, 0.016): mean 16, sd 4; the busiest of 1,000 ~1.8x.
        assert!((1.4..2.4).contains(&ratio), "max/mean {ratio}");
    }

    #[test]
    fn removing_one_endpoint_moves_few_members() {
        let servers = addrs(1000);
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..5 {
            let mut after = servers.clone();
            after.remove(rng.random_range(0..after.len()));
            let rendezvous = moved(SubsetMode::Rendezvous, 1000, &servers, &after, 16);
            // Only the ~16 subsets holding it change, one member each.
            assert!(rendezvous <= 0.002, "rendezvous moved {rendezvous}");
            let deterministic = moved(SubsetMode::Deterministic, 1000, &servers, &after, 16);
            // At most the slices between its rank and their anchor: ≤ 1/(2 × 16).
            assert!(
                deterministic <= 0.035,
                "deterministic moved {deterministic}"
            );
            let mut added = servers.clone();
            added.push(SocketAddr::from(([10, 9, 9, 9], 1)));
            let rendezvous = moved(SubsetMode::Rendezvous, 1000, &servers, &added, 16);
            assert!(
                rendezvous <= 0.002,
                "rendezvous moved {rendezvous} on an add"
            );
        }
    }

    #[test]
    fn a_rendezvous_client_without_an_id_gets_a_random_seed_and_the_same_id_the_same_subset() {
        let servers = addrs(200);
        let anonymous = SubsetConfig {
            client_id: None,
            ..config(SubsetMode::Rendezvous, "x", 8)
        };
        let a = subset_members(&anonymous, &servers);
        let b = subset_members(&anonymous, &servers);
        assert_ne!(a, b, "two random seeds (1 in 10^12 to agree)");
        let named = config(SubsetMode::Rendezvous, "orders-3", 8);
        assert_eq!(
            subset_members(&named, &servers),
            subset_members(&named, &servers)
        );
    }

    #[test]
    fn the_preference_order_extends_the_subset() {
        let servers = addrs(100);
        for mode in [SubsetMode::Rendezvous, SubsetMode::Deterministic] {
            let subset = Subset::new(&config(mode, "c-3", 8));
            let wide = subset.preference(&servers, 20);
            assert_eq!(wide.len(), 20);
            assert_eq!(wide[..8], subset.preference(&servers, 8)[..], "{mode:?}");
        }
        let s = Subset::new(&config(SubsetMode::Rendezvous, "c", 16));
        assert_eq!(s.needed(), 12, "25 % of 16 may be unusable");
    }
}
