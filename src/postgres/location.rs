//! Where a store on PostgreSQL is: a `postgres://` URL and a namespace.

use std::{fmt, str::FromStr, time::Duration};

use postgres::{
    Client, NoTls,
    config::{Config, Host},
};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::{self, Mode};

use crate::{Error, Result};

/// The query parameter that names the store's namespace.
const NAMESPACE: &str = "namespace";
/// The URL parameters the client takes.
const SETTINGS: &[&str] = &[
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];
/// The longest namespace.
const MAX_NAMESPACE: usize = 63;
/// How long a connection may take to open, unless the location says.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long data sent may go unacknowledged before the connection is given up,
/// unless the location says.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// A store's place in a PostgreSQL database: the connection settings of a
/// `postgres://` (or `postgresql://`) URL, and the store's namespace, its
/// `namespace` query parameter (`postgres://app@db/prod?namespace=orders`).
///
/// What the URL leaves out comes from the standard environment variables, as
/// `psql` takes them: `PGHOST` and `PGPORT` (when the URL names no host),
/// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`,
/// `PGCONNECT_TIMEOUT` and `PGAPPNAME`. The user defaults to `postgres`, the host to `localhost`, the
/// port to 5432, `connect_timeout` to 10 s and `tcp_user_timeout` to 30 s (a
/// server that stops answering is an error, not a caller stuck for minutes).
///
/// TLS is as libpq's `sslmode` asks (`disable`, `prefer` by default, `require`,
/// `verify-ca`, `verify-full`), with rustls; the verifying modes trust the roots
/// of the PEM file `sslrootcert` names.
///
/// A namespace is 1 to 63 ASCII letters, digits, `-`, `_` and `.`; many stores
/// share one database, each in its namespace.
///
/// Shown (`Display`, `Debug`, and in every error) without its password.
///
/// # Example
/// ```
/// use instastate::postgres::Location;
///
/// # fn main() -> instastate::Result<()> {
/// let location = Location::parse("postgres://app:s3cret@db:5433/prod?namespace=orders")?;
/// assert_eq!(location.namespace(), "orders");
/// assert_eq!(location.to_string(), "postgres://app@db:5433/prod?namespace=orders");
/// assert!(Location::parse("postgres://app@db/prod").is_err()); // no namespace
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Location {
    config: Config,
    namespace: String,
    /// What `sslmode` asks for, and the connector that does it (none for
    /// `disable`).
    tls: Mode,
    connector: Option<MakeRustlsConnect>,
}

impl Location {
    /// Parses `url`, completing it from the process's environment.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] when `url` is not a `postgres://` URL the client
    /// accepts, or lacks a valid namespace.
    pub fn parse(url: &str) -> Result<Location> {
        Location::parse_with(url, |name| std::env::var(name).ok())
    }

    /// Parses `url`, completing it from `env` in place of the environment.
    pub(crate) fn parse_with(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<Location> {
        let invalid = |reason: String| Error::InvalidLocation {
            location: crate::location::redacted(url),
            reason,
        };
        let Some(rest) =
            url.strip_prefix("postgres://").or_else(|| url.strip_prefix("postgresql://"))
        else {
            return Err(invalid("it is not a postgres:// URL".into()));
        };
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut namespace = None;
        let (mut ssl_mode, mut root_cert) = (None, None);
        let mut others = Vec::new();
        for pair in query.split('&').filter(|it| !it.is_empty()) {
            match pair.split_once('=') {
                Some((NAMESPACE, value)) if namespace.is_none() => namespace = Some(value),
                Some((NAMESPACE, _)) => return Err(invalid("it names two namespaces".into())),
                // TLS is this module's: the client knows fewer modes.
                Some(("sslmode", value)) => ssl_mode = Some(value.to_owned()),
                Some(("sslrootcert", value)) => root_cert = Some(value.to_owned()),
                _ => others.push(pair),
            }
        }
        let namespace = namespace.ok_or_else(|| {
            invalid("it names no namespace: add `?namespace=NAME` to the URL".into())
        })?;
        check_namespace(namespace).map_err(invalid)?;
        if let Some(unknown) = others
            .iter()
            .map(|pair| pair.split_once('=').map_or(*pair, |(key, _)| key))
            .find(|key| !SETTINGS.contains(key))
        {
            return Err(invalid(format!(
                "its parameter `{unknown}` is not a connection setting (those are {}, and `namespace`)",
                SETTINGS.join(", ")
            )));
        }
        let mut client_url = format!("postgresql://{base}");
        if !others.is_empty() {
            client_url = format!("{client_url}?{}", others.join("&"));
        }
        let mut config = Config::from_str(&client_url).map_err(|err| {
            invalid(format!("the client cannot read it as a connection URL ({err})"))
        })?;
        complete(&mut config, &env).map_err(&invalid)?;
        let tls = Mode::parse(
            &ssl_mode.or_else(|| env("PGSSLMODE")).unwrap_or_else(|| "prefer".to_owned()),
        )
        .map_err(&invalid)?;
        config.ssl_mode(tls.client_mode());
        let root_cert = root_cert.or_else(|| env("PGSSLROOTCERT")).map(std::path::PathBuf::from);
        let connector = match tls {
            Mode::Disable => None,
            mode => Some(tls::connector(mode, root_cert.as_ref()).map_err(&invalid)?),
        };
        Ok(Location { config, namespace: namespace.to_owned(), tls, connector })
    }

    /// The store's namespace.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A new connection to the database, which compiles no statement (JIT): each
    /// of ours is short, and its plan's estimated cost alone can cross the
    /// compiling threshold (a page of 10,000 events took 40 ms with the
    /// compiling, 3.6 ms without, on a server built with LLVM as Debian's is).
    pub(crate) fn connect(&self) -> Result<Client> {
        self.connect_with("")
    }

    /// A new connection as [`connect`](Self::connect) makes, set up further by the
    /// statements `more` (`SET ..;`) in the same round trip.
    pub(crate) fn connect_with(&self, more: &str) -> Result<Client> {
        let connected = match &self.connector {
            None => self.config.connect(NoTls),
            Some(connector) => self.config.connect(connector.clone()),
        };
        let mut client = connected.map_err(super::failed(self, "connect"))?;
        client
            .batch_execute(&format!("SET jit = off;{more}"))
            .map_err(super::failed(self, "set up a connection"))?;
        Ok(client)
    }

    /// The same database, another namespace.
    pub(crate) fn with_namespace(&self, namespace: &str) -> Result<Location> {
        check_namespace(namespace)
            .map_err(|reason| Error::InvalidLocation { location: self.to_string(), reason })?;
        Ok(Location { namespace: namespace.to_owned(), ..self.clone() })
    }

    /// The namespace of something kept beside this one's store (a journaled
    /// cell's journal): this namespace, `/` and `name`. A user's namespace holds
    /// no `/`, so none is another's.
    pub(crate) fn beside(&self, name: &str) -> Location {
        Location { namespace: format!("{}/{name}", self.namespace), ..self.clone() }
    }

    /// Another database of the same server, for tests that change what all
    /// namespaces of a database share.
    #[cfg(test)]
    pub(crate) fn with_database(&self, database: &str) -> Location {
        let mut location = self.clone();
        location.config.dbname(database);
        location
    }
}

/// Whether `namespace` is one a location may name; why not.
fn check_namespace(namespace: &str) -> std::result::Result<(), String> {
    if namespace.is_empty() || MAX_NAMESPACE < namespace.len() {
        return Err(format!("its namespace must be 1 to {MAX_NAMESPACE} characters long"));
    }
    if let Some(bad) =
        namespace.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "its namespace {namespace:?} holds {bad:?}: only ASCII letters, digits, `-`, `_` and `.` may"
        ));
    }
    Ok(())
}

/// Fills in what the URL left out from the `PG*` variables `env` gives, then the
/// defaults.
fn complete(config: &mut Config, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
    if config.get_hosts().is_empty() {
        let hosts = env("PGHOST").unwrap_or_else(|| "localhost".to_owned());
        for host in hosts.split(',') {
            config.host(host);
        }
        if let Some(port) = env("PGPORT") {
            let port = port.parse().map_err(|_| format!("PGPORT {port:?} is not a port"))?;
            config.port(port);
        }
    }
    if config.get_user().is_none() {
        config.user(env("PGUSER").as_deref().unwrap_or("postgres"));
    }
    if config.get_password().is_none()
        && let Some(password) = env("PGPASSWORD")
    {
        config.password(password);
    }
    if config.get_dbname().is_none()
        && let Some(dbname) = env("PGDATABASE")
    {
        config.dbname(&dbname);
    }
    if config.get_connect_timeout().is_none()
        && let Some(secs) = env("PGCONNECT_TIMEOUT")
    {
        let secs: u64 =
            secs.parse().map_err(|_| format!("PGCONNECT_TIMEOUT {secs:?} is not seconds"))?;
        config.connect_timeout(Duration::from_secs(secs));
    }
    // A server that cannot be reached, or stops answering, is an error in
    // seconds rather than a caller stuck for the system's TCP timeouts (minutes).
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name(env("PGAPPNAME").as_deref().unwrap_or("instastate"));
    }
    Ok(())
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.config.get_user().unwrap_or_default();
        f.write_str("postgres://")?;
        if !user.is_empty() {
            write!(f, "{user}@")?;
        }
        let ports = self.config.get_ports();
        for (k, host) in self.config.get_hosts().iter().enumerate() {
            if 0 < k {
                f.write_str(",")?;
            }
            match host {
                Host::Tcp(name) => f.write_str(name)?,
                Host::Unix(path) => write!(f, "[{}]", path.display())?,
            }
            if let Some(port) = ports.get(k).or_else(|| ports.first()) {
                write!(f, ":{port}")?;
            }
        }
        write!(
            f,
            "/{}?namespace={}",
            self.config.get_dbname().unwrap_or_default(),
            self.namespace
        )?;
        if self.tls != Mode::Prefer {
            write!(f, "&sslmode={}", self.tls)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Location").field(&self.to_string()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_url_gives_its_settings_and_namespace_and_never_shows_its_password() -> Result<()> {
        let location =
            Location::parse_with("postgres://app:s3cret@db:5433/prod?namespace=orders", no_env)?;
        assert_eq!(location.namespace(), "orders");
        assert_eq!(location.config.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(location.to_string(), "postgres://app@db:5433/prod?namespace=orders");
        assert!(!format!("{location:?}").contains("s3cret"));
        let err = Location::parse_with("postgres://app:s3cret@db/prod", no_env).map(drop);
        let Err(err @ Error::InvalidLocation { .. }) = err else { panic!("{err:?}") };
        assert!(!err.to_string().contains("s3cret"), "{err}");
        assert!(err.to_string().contains("namespace"), "{err}");
        Ok(())
    }

    #[test]
    fn bad_locations_are_refused_with_the_reason() {
        for (url, says) in [
            ("mysql://db/prod?namespace=a", "postgres://"),
            ("postgres://db/prod?namespace=", "1 to 63"),
            ("postgres://db/prod?namespace=a b", "holds ' '"),
            ("postgres://db/prod?namespace=a&namespace=b", "two namespaces"),
            ("postgres://db/prod?namespace=a&nonsense=1", "`nonsense` is not"),
            ("postgres://db:notaport/prod?namespace=a", "cannot read it"),
        ] {
            match Location::parse_with(url, no_env) {
                Err(Error::InvalidLocation { reason, .. }) => {
                    assert!(reason.contains(says), "{url}: {reason}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn what_the_url_leaves_out_comes_from_the_pg_variables() -> Result<()> {
        let env = |name: &str| {
            let value = match name {
                "PGHOST" => "h1",
                "PGPORT" => "6000",
                "PGUSER" => "u",
                "PGPASSWORD" => "pw",
                "PGDATABASE" => "d",
                _ => return None,
            };
            Some(value.to_owned())
        };
        let location = Location::parse_with("postgres://?namespace=n", env)?;
        assert_eq!(location.to_string(), "postgres://u@h1:6000/d?namespace=n");
        assert_eq!(location.config.get_password(), Some(&b"pw"[..]));
        // The URL wins over the environment.
        let location = Location::parse_with("postgres://me@there/mine?namespace=n", env)?;
        assert_eq!(location.to_string(), "postgres://me@there:5432/mine?namespace=n");
        assert_eq!(crate::location::redacted("postgres://u:pw@h/d?x=1"), "postgres://u@h/d?x=1");
        Ok(())
    }
}
