//! A real DNS server for tests: answers A queries over UDP on loopback from
//! a table the test changes, like a Kubernetes headless Service whose ready
//! pods come and go.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, Record, RecordType, rdata::A},
};
use tokio::net::UdpSocket;

type Table = Arc<Mutex<HashMap<String, Vec<Ipv4Addr>>>>;

pub struct TestDns {
    pub addr: SocketAddr,
    records: Table,
    task: tokio::task::JoinHandle<()>,
}

fn normalise(name: &str) -> String {
    let name = name.to_ascii_lowercase();
    if name.ends_with('.') {
        name
    } else {
        format!("{name}.")
    }
}

impl TestDns {
    pub async fn start() -> TestDns {
        TestDns::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// A server bound to `addr` (in a test bed, a pod's address).
    pub async fn start_on(addr: SocketAddr) -> TestDns {
        let socket = UdpSocket::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let records: Table = Arc::default();
        let table = records.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let mut response = Message::response(query.metadata.id, query.metadata.op_code);
                response.metadata.authoritative = true;
                response.metadata.recursion_desired = query.metadata.recursion_desired;
                let mut known = false;
                for q in &query.queries {
                    response.add_query(q.clone());
                    let name = normalise(&q.name().to_string());
                    let table = table.lock().unwrap();
                    if let Some(ips) = table.get(&name) {
                        known = !ips.is_empty();
                        if q.query_type() == RecordType::A {
                            for ip in ips {
                                response.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    0,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                    }
                }
                if !known {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        TestDns {
            addr,
            records,
            task,
        }
    }

    /// Sets the A records of `name` (no records: NXDOMAIN).
    pub fn set(&self, name: &str, ips: &[Ipv4Addr]) {
        self.records
            .lock()
            .unwrap()
            .insert(normalise(name), ips.to_vec());
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}
