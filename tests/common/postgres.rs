//! The services' databases: SQLite files, or fresh databases on the
//! PostgreSQL server CI starts (`MESH_TEST_POSTGRES_URL`).

use std::path::Path;

use super::skip_or_fail;

/// Which database the services use.
#[derive(Clone, Debug)]
pub enum Db {
    /// SQLite files in the shop's temporary directory.
    Sqlite,
    /// Fresh databases on the PostgreSQL server at this admin URL.
    Postgres(String),
}

impl Db {
    /// PostgreSQL from `MESH_TEST_POSTGRES_URL`, or a skip.
    pub fn postgres() -> Option<Db> {
        match std::env::var("MESH_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(Db::Postgres(url)),
            _ => {
                skip_or_fail("MESH_TEST_POSTGRES_URL is not set, so PostgreSQL tests cannot run")?;
                unreachable!()
            }
        }
    }

    /// A new empty database for `service`, as a URL.
    pub async fn create(&self, dir: &Path, service: &str) -> String {
        match self {
            Db::Sqlite => format!("sqlite://{}", dir.join(format!("{service}.db")).display()),
            Db::Postgres(admin) => {
                use sqlx::Connection;
                sqlx::any::install_default_drivers();
                let name = format!("t_{}_{service}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::AnyConnection::connect(admin)
                    .await
                    .unwrap_or_else(|e| panic!("connecting to {admin}: {e}"));
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE");
                let (base, _) = admin.rsplit_once('/').expect("admin URL ends in /<db>");
                format!("{base}/{name}")
            }
        }
    }
}
