//! Test harness for coursegate's integration tests: a real OpenLDAP `slapd` per test, plus helpers
//! to run the `coursegate` binary.
//!
//! [`Slapd::start`] creates a temporary directory with a `slapd.conf` made from
//! `examples/slapd.conf.in` (schemas core, cosine, inetorgperson and nis; one mdb database for
//! `dc=example,dc=org`; the ACLs below — scripts/demo.sh uses the same file), loads the initial
//! entries offline with `slapd -T add`, and runs `slapd` in the foreground on a random free
//! loopback port. It returns once an `ldapwhoami` as the admin succeeds, and kills `slapd` when
//! dropped. Everything a test asserts about the directory is read back independently with the
//! OpenLDAP command-line tools (`ldapsearch`, `ldapadd`, `ldapmodify`) as the admin — never
//! through coursegate's own LDAP code.
//!
//! The initial directory ([`base_ldif`]):
//!
//! * `ou=people`, `ou=groups`, `ou=services` under `dc=example,dc=org`;
//! * the service account [`SERVICE_DN`] with password [`SERVICE_PASSWORD`] (the one in
//!   `examples/ldap-password`);
//! * the placeholder [`PLACEHOLDER_DN`];
//! * `groupOfNames` groups [`WIM_GROUP`], [`PACS_GROUP`], [`KARDIOPACS_GROUP`] (`member`, the
//!   placeholder as only member), the `groupOfUniqueNames` [`UNIQUE_GROUP`] (`uniqueMember`, the
//!   placeholder) and the `posixGroup` [`POSIX_GROUP`] (`memberUid`, gidNumber 5000, no members).
//!
//! Access control: the service account may read everything under `ou=people` and `ou=groups`
//! (never `userPassword`) and write only `member`, `uniqueMember` and `memberUid` of entries under
//! `ou=groups`; the root DSE and schema are readable by any bound user; anonymous clients may only
//! bind. The admin ([`ADMIN_DN`], the rootdn) is unlimited. Everyone else gets slapd's default
//! limits: at most 500 entries per search, **paged or not** (see [`Options::extra_db_config`]).
//!
//! slapd prettifies DNs: `member` values and entry DNs come back with attribute types in lower
//! case and the RFC 4514 specials (`,+"\<>;=`, a leading `#` or space, a trailing space) as hex
//! escapes (`\2C`). [`user_dn`] produces exactly that form, so tests can compare strings.
//!
//! TLS ([`Slapd::start_tls`]): the server certificate names `127.0.0.1` and `localhost`. Point
//! OpenLDAP's own client tools at `127.0.0.1`: for `localhost` they check the certificate against
//! the machine's host name instead and fail. Their `LDAPNOINIT` (set by [`Slapd::admin_tool`])
//! also makes them ignore `LDAPTLS_*` variables.
//!
//! Needs the Debian packages `slapd` and `ldap-utils` (and `openssl` for TLS); a missing tool is
//! a panic that says how to install it, never a silently skipped test.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tempfile::TempDir;

/// The suffix of the test directory.
pub const BASE_DN: &str = "dc=example,dc=org";
/// The rootdn; its password is random per instance ([`Slapd::admin_password`]).
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
/// The account coursegate binds as.
pub const SERVICE_DN: &str = "cn=coursegate,ou=services,dc=example,dc=org";
/// The service account's password: the demo password shipped in `examples/ldap-password`.
pub const SERVICE_PASSWORD: &str = include_str!("../../examples/ldap-password").trim_ascii_end();
pub const PEOPLE_BASE: &str = "ou=people,dc=example,dc=org";
pub const GROUPS_BASE: &str = "ou=groups,dc=example,dc=org";
pub const SERVICES_BASE: &str = "ou=services,dc=example,dc=org";
/// Initial member of the `groupOfNames`/`groupOfUniqueNames` groups, which need at least one.
pub const PLACEHOLDER_DN: &str = "cn=nobody,dc=example,dc=org";
pub const WIM_GROUP: &str = "cn=wim-users,ou=groups,dc=example,dc=org";
pub const PACS_GROUP: &str = "cn=pacs-users,ou=groups,dc=example,dc=org";
pub const KARDIOPACS_GROUP: &str = "cn=kardiopacs-users,ou=groups,dc=example,dc=org";
/// A `groupOfUniqueNames` (attribute `uniqueMember`), the placeholder as initial member.
pub const UNIQUE_GROUP: &str = "cn=unique-users,ou=groups,dc=example,dc=org";
/// A `posixGroup` (attribute `memberUid`, account names), gidNumber 5000, no members.
pub const POSIX_GROUP: &str = "cn=posix-users,ou=groups,dc=example,dc=org";

const SLAPD: &str = "/usr/sbin/slapd";
/// The server configuration, shared with scripts/demo.sh: schemas, database and ACLs.
const SLAPD_CONF_TEMPLATE: &str = include_str!("../../examples/slapd.conf.in");
const INSTALL_HINT: &str = "install them with: sudo apt-get install slapd ldap-utils openssl \
                            (or run scripts/test.sh, which does)";
/// How long a start may take before the test fails (generous: parallel tests on 2 cores).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`run_coursegate`] waits for the binary before killing it.
pub const COURSEGATE_TIMEOUT: Duration = Duration::from_secs(120);

/// How to start a [`Slapd`]; `Options::default()` is what [`Slapd::start`] uses.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also serve `ldaps://` on a second port and allow StartTLS, with a throwaway CA.
    pub tls: bool,
    /// Entries to load instead of [`base_ldif`]; must create `dc=example,dc=org` itself.
    pub initial_ldif: Option<String>,
    /// Extra `slapd.conf` lines for the database, after its ACLs — e.g.
    /// `limits dn.exact="cn=coursegate,ou=services,dc=example,dc=org" size.prtotal=unlimited`
    /// to let the service account page past 500 entries.
    pub extra_db_config: String,
}

/// A running (or stopped) slapd with its own data directory and ports.
pub struct Slapd {
    dir: TempDir,
    port: u16,
    ldaps_port: Option<u16>,
    admin_password: String,
    child: Option<Child>,
}

// === impl Slapd ===

impl Slapd {
    /// Starts a slapd on `ldap://127.0.0.1:PORT` with [`base_ldif`].
    pub fn start() -> Slapd {
        Slapd::start_with(Options::default())
    }

    /// Like [`Slapd::start`], plus `ldaps://` on a second port and StartTLS on the first, with a
    /// server certificate for `127.0.0.1`/`localhost` issued by a fresh CA ([`Slapd::ca_file`]).
    pub fn start_tls() -> Slapd {
        Slapd::start_with(Options {
            tls: true,
            ..Options::default()
        })
    }

    /// Starts a slapd as `options` say; see the module docs for what the default holds.
    pub fn start_with(options: Options) -> Slapd {
        require_tools(options.tls);
        let dir = tempfile::Builder::new()
            .prefix("coursegate-slapd-")
            .tempdir()
            .expect("create a temporary directory for slapd");
        std::fs::create_dir(dir.path().join("data")).expect("create slapd's data directory");
        if options.tls {
            make_certificates(dir.path());
        }
        let admin_password = format!("admin-{:016x}", random_u64());
        let config = slapd_conf(
            dir.path(),
            &admin_password,
            options.tls,
            &options.extra_db_config,
        );
        let config_path = write_file(dir.path(), "slapd.conf", &config);
        let ldif = options.initial_ldif.unwrap_or_else(base_ldif);
        let ldif_path = write_file(dir.path(), "initial.ldif", &ldif);
        let load = Command::new(SLAPD)
            .args(["-T", "add", "-q", "-f"])
            .arg(&config_path)
            .arg("-l")
            .arg(&ldif_path)
            .output()
            .expect("run slapd -T add");
        check_output("slapd -T add (loading the initial LDIF)", &load);

        let mut slapd = Slapd {
            dir,
            port: 0,
            ldaps_port: None,
            admin_password,
            child: None,
        };
        // Another process can take a port between our check and slapd's bind; pick new ones.
        for _ in 0..20 {
            slapd.port = free_port();
            slapd.ldaps_port = options.tls.then(free_port);
            if slapd.launch() {
                return slapd;
            }
        }
        panic!(
            "slapd: no free port after 20 attempts; log:\n{}",
            slapd.log()
        );
    }

    /// `ldap://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:PORT2`; panics unless started with TLS.
    pub fn ldaps_url(&self) -> String {
        let port = self
            .ldaps_port
            .expect("ldaps_url: slapd was started without TLS");
        format!("ldaps://127.0.0.1:{port}")
    }

    /// The port of [`Slapd::url`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The PEM file of the CA that issued the server certificate; panics unless started with TLS.
    pub fn ca_file(&self) -> PathBuf {
        assert!(
            self.ldaps_port.is_some(),
            "ca_file: slapd was started without TLS"
        );
        self.dir.path().join("ca.pem")
    }

    pub fn base(&self) -> &'static str {
        BASE_DN
    }

    pub fn admin_dn(&self) -> &'static str {
        ADMIN_DN
    }

    pub fn admin_password(&self) -> &str {
        &self.admin_password
    }

    pub fn service_dn(&self) -> &'static str {
        SERVICE_DN
    }

    pub fn service_password(&self) -> &'static str {
        SERVICE_PASSWORD
    }

    /// The temporary directory holding slapd.conf, data/, slapd.log (and the TLS files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// slapd's own output so far (errors only; it runs with `-d none`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("poll slapd").is_none(),
            None => false,
        }
    }

    /// Kills slapd (SIGKILL, like a crash: LMDB keeps every committed change). The ports stay
    /// reserved for [`Slapd::restart`]; connecting now fails with "connection refused".
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts slapd again on the same ports with the same data (stopping it first if needed).
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The old listening socket is gone once the process is reaped; retry in case some other
        // process grabbed the port in between.
        while !self.launch() {
            assert!(
                Instant::now() < deadline,
                "slapd restart: port {} stays in use; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Spawns slapd on the current ports and waits until it answers. Returns false if a port was
    /// in use; panics on any other failure.
    fn launch(&mut self) -> bool {
        let log_path = self.dir.path().join("slapd.log");
        let log_start = std::fs::metadata(&log_path).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open slapd.log");
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(port) = self.ldaps_port {
            write!(urls, " ldaps://127.0.0.1:{port}/").unwrap();
        }
        // `-d none`: stay in the foreground (so we own the process) and print only errors.
        let child = Command::new(SLAPD)
            .args(["-d", "none", "-h", &urls, "-f"])
            .arg(self.dir.path().join("slapd.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone slapd.log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {SLAPD}: {e}; {INSTALL_HINT}"));
        self.child = Some(child);

        let started = Instant::now();
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("poll slapd"));
            if let Some(status) = exited {
                self.child = None;
                let log = self.log();
                let this_run = log.get(log_start as usize..).unwrap_or(&log);
                if this_run.contains("errno=98") || this_run.contains("Address already in use") {
                    return false;
                }
                panic!("slapd exited during start ({status}); log:\n{this_run}");
            }
            // A TCP connect alone proves little: slapd listens before its database is open, and
            // the port might be someone else's. The admin password is unique to this instance.
            if self.ports_accept() && self.whoami_as_admin() {
                return true;
            }
            if started.elapsed() > START_TIMEOUT {
                self.stop();
                panic!(
                    "slapd did not answer within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn ports_accept(&self) -> bool {
        std::iter::once(self.port)
            .chain(self.ldaps_port)
            .all(|port| {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
    }

    fn whoami_as_admin(&self) -> bool {
        self.admin_tool("ldapwhoami")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// An OpenLDAP client command (`ldapsearch`, `ldapmodify`, …) bound as the admin over
    /// plain `ldap://`, ignoring `ldap.conf`/`.ldaprc` (`LDAPNOINIT`); add the operation's args.
    pub fn admin_tool(&self, program: &str) -> Command {
        self.tool_as(program, ADMIN_DN, &self.admin_password)
    }

    /// Like [`Slapd::admin_tool`], bound as the service account coursegate uses.
    pub fn service_tool(&self, program: &str) -> Command {
        self.tool_as(program, SERVICE_DN, SERVICE_PASSWORD)
    }

    /// Like [`Slapd::admin_tool`], bound as `dn` with `password`.
    pub fn tool_as(&self, program: &str, dn: &str, password: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("LDAPNOINIT", "1")
            .args(["-x", "-H", &self.url(), "-D", dn, "-w", password]);
        cmd
    }

    /// Adds the entries of `ldif` (content records) as the admin; panics with ldapadd's stderr.
    pub fn add_ldif(&self, ldif: &str) {
        let out = run_with_input(self.admin_tool("ldapadd"), ldif);
        check_output(&format!("ldapadd of\n{ldif}"), &out);
    }

    /// Applies `ldif` (change records, `changetype: modify` …) as the admin; panics on failure.
    pub fn modify_ldif(&self, ldif: &str) {
        let out = run_with_input(self.admin_tool("ldapmodify"), ldif);
        check_output(&format!("ldapmodify of\n{ldif}"), &out);
    }

    /// Creates the `inetOrgPerson` `uid=<uid>,ou=people,dc=example,dc=org` with the given `cn`
    /// (also its `sn`) and mail `<uid>@example.org` (non-ASCII transliterated or replaced, as
    /// `mail` is IA5). Returns the DN as slapd reports it (see [`user_dn`]).
    pub fn add_user(&self, uid: &str, cn: &str) -> String {
        self.add_users(&[(uid, cn)]).remove(0)
    }

    /// [`Slapd::add_user`] for many users in one `ldapadd` (fast: ~1 ms per entry).
    pub fn add_users(&self, users: &[(&str, &str)]) -> Vec<String> {
        let mut ldif = String::new();
        for (uid, cn) in users {
            ldif.push_str(&user_entry_ldif(uid, cn));
            ldif.push('\n');
        }
        self.add_ldif(&ldif);
        users.iter().map(|(uid, _)| user_dn(uid)).collect()
    }

    /// Adds one value to a group's member attribute as the admin (a "hand-added" member).
    pub fn add_member(&self, group_dn: &str, attr: &str, value: &str) {
        self.modify_ldif(&member_change(group_dn, "add", attr, value));
    }

    /// Removes one value from a group's member attribute as the admin.
    pub fn remove_member(&self, group_dn: &str, attr: &str, value: &str) {
        self.modify_ldif(&member_change(group_dn, "delete", attr, value));
    }

    /// The values of `attr` (`member`, `uniqueMember`, `memberUid`) of the entry `group_dn`,
    /// read with `ldapsearch` as the admin. Panics if the entry does not exist.
    pub fn members(&self, group_dn: &str, attr: &str) -> BTreeSet<String> {
        let entries = self.search(group_dn, "base", "(objectClass=*)", &[attr]);
        assert_eq!(entries.len(), 1, "members: no entry {group_dn}");
        entries[0]
            .values(attr)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// `ldapsearch` as the admin; `scope` is `base`, `one` or `sub`; empty `attrs` means all
    /// user attributes. Panics on any error (including "no such object").
    pub fn search(&self, base: &str, scope: &str, filter: &str, attrs: &[&str]) -> Vec<Entry> {
        let out = self
            .admin_tool("ldapsearch")
            .args([
                "-LLL",
                "-o",
                "ldif-wrap=no",
                "-b",
                base,
                "-s",
                scope,
                filter,
            ])
            .args(attrs)
            .output()
            .unwrap_or_else(|e| panic!("run ldapsearch: {e}; {INSTALL_HINT}"));
        check_output(&format!("ldapsearch -b {base} -s {scope} {filter}"), &out);
        parse_ldif(&String::from_utf8(out.stdout).expect("ldapsearch output is UTF-8"))
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One entry of `ldapsearch` output, values decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dn: String,
    /// `(attribute, value)` in the order ldapsearch printed them.
    pub attrs: Vec<(String, String)>,
}

impl Entry {
    /// The values of `attr` (name compared case-insensitively).
    pub fn values(&self, attr: &str) -> Vec<&str> {
        self.attrs
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(attr))
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

// === the directory's contents ===

/// The initial entries of [`Slapd::start`] (see the module docs).
pub fn base_ldif() -> String {
    format!(
        "\
dn: {BASE_DN}
objectClass: dcObject
objectClass: organization
dc: example
o: Example Region

dn: {PEOPLE_BASE}
objectClass: organizationalUnit
ou: people

dn: {GROUPS_BASE}
objectClass: organizationalUnit
ou: groups

dn: {SERVICES_BASE}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: coursegate
{password}
dn: {PLACEHOLDER_DN}
objectClass: organizationalRole
cn: nobody

dn: {WIM_GROUP}
objectClass: groupOfNames
cn: wim-users
member: {PLACEHOLDER_DN}

dn: {PACS_GROUP}
objectClass: groupOfNames
cn: pacs-users
member: {PLACEHOLDER_DN}

dn: {KARDIOPACS_GROUP}
objectClass: groupOfNames
cn: kardiopacs-users
member: {PLACEHOLDER_DN}

dn: {UNIQUE_GROUP}
objectClass: groupOfUniqueNames
cn: unique-users
uniqueMember: {PLACEHOLDER_DN}

dn: {POSIX_GROUP}
objectClass: posixGroup
cn: posix-users
gidNumber: 5000
",
        password = ldif_line("userPassword", SERVICE_PASSWORD),
    )
}

/// The LDIF content record [`Slapd::add_user`] adds.
pub fn user_entry_ldif(uid: &str, cn: &str) -> String {
    let mut ldif = ldif_line("dn", &user_dn(uid));
    ldif.push_str("objectClass: inetOrgPerson\n");
    ldif.push_str(&ldif_line("uid", uid));
    ldif.push_str(&ldif_line("cn", cn));
    ldif.push_str(&ldif_line("sn", cn));
    ldif.push_str(&ldif_line(
        "mail",
        &format!("{}@example.org", ascii_mailbox(uid)),
    ));
    ldif
}

/// `uid=<uid>,ou=people,dc=example,dc=org`, escaped exactly as slapd prints it.
pub fn user_dn(uid: &str) -> String {
    format!("uid={},{PEOPLE_BASE}", escape_dn_value(uid))
}

/// Escapes an RDN attribute value (RFC 4514) the way slapd prettifies DNs: `, + " \ < > ; =`
/// anywhere, a leading `#` or space and a trailing space become `\XX` hex escapes; everything
/// else, non-ASCII included, is kept as it is.
pub fn escape_dn_value(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            write!(out, "\\{:02X}", c as u32).unwrap();
        } else {
            out.push(c);
        }
    }
    out
}

/// Escapes a value for an LDAP search filter (RFC 4515): `*`, `(`, `)`, `\` and NUL.
pub fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' | '(' | ')' | '\\' | '\0' => write!(out, "\\{:02x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out
}

/// One LDIF attribute line, base64-encoded (`attr:: …`) when RFC 2849 requires it (non-ASCII,
/// control characters, a leading space, `:` or `<`) or when it ends in a space.
pub fn ldif_line(attr: &str, value: &str) -> String {
    let safe = !value.starts_with([' ', ':', '<'])
        && !value.ends_with(' ')
        && value.bytes().all(|b| (0x20..0x7f).contains(&b));
    if safe {
        format!("{attr}: {value}\n")
    } else {
        format!("{attr}:: {}\n", base64_encode(value.as_bytes()))
    }
}

fn member_change(group_dn: &str, op: &str, attr: &str, value: &str) -> String {
    format!(
        "{}changetype: modify\n{op}: {attr}\n{}-\n",
        ldif_line("dn", group_dn),
        ldif_line(attr, value)
    )
}

/// An IA5 (ASCII) local part for `mail`: Swedish and other common Latin letters lose their
/// diacritics, anything else non-ASCII becomes `_`.
fn ascii_mailbox(uid: &str) -> String {
    uid.chars()
        .map(|c| match c {
            'å' | 'ä' | 'à' | 'á' | 'â' | 'ã' => 'a',
            'Å' | 'Ä' | 'À' | 'Á' | 'Â' | 'Ã' => 'A',
            'ö' | 'ø' | 'ó' | 'ò' | 'ô' | 'õ' => 'o',
            'Ö' | 'Ø' | 'Ó' | 'Ò' | 'Ô' | 'Õ' => 'O',
            'é' | 'è' | 'ê' | 'ë' => 'e',
            'É' | 'È' | 'Ê' | 'Ë' => 'E',
            'ü' | 'ú' | 'ù' | 'û' => 'u',
            'Ü' | 'Ú' | 'Ù' | 'Û' => 'U',
            'í' | 'ì' | 'î' | 'ï' => 'i',
            c if c.is_ascii() && !c.is_ascii_control() => c,
            _ => '_',
        })
        .collect()
}

/// Parses `ldapsearch -LLL` output: entries separated by blank lines, `attr: value` or
/// `attr:: base64`, continuation lines starting with one space.
pub fn parse_ldif(text: &str) -> Vec<Entry> {
    // Unfold first, so that a value never spans lines.
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        match (line.strip_prefix(' '), lines.last_mut()) {
            (Some(rest), Some(last)) if !last.is_empty() => last.push_str(rest),
            _ => lines.push(line.to_owned()),
        }
    }
    let mut entries = Vec::new();
    let mut current: Option<Entry> = None;
    for line in lines {
        if line.is_empty() {
            entries.extend(current.take());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (attr, rest) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("unexpected LDIF line {line:?}"));
        let value = match rest.strip_prefix(':') {
            Some(b64) => String::from_utf8(base64_decode(b64.trim()))
                .unwrap_or_else(|_| panic!("LDIF value of {attr} is not UTF-8")),
            None => rest.strip_prefix(' ').unwrap_or(rest).to_owned(),
        };
        match &mut current {
            None => {
                assert!(
                    attr.eq_ignore_ascii_case("dn"),
                    "LDIF entry without dn: {line:?}"
                );
                current = Some(Entry {
                    dn: value,
                    attrs: Vec::new(),
                });
            }
            Some(entry) => entry.attrs.push((attr.to_owned(), value)),
        }
    }
    entries.extend(current);
    entries
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = BASE64
            .iter()
            .position(|&b| b == c)
            .unwrap_or_else(|| panic!("invalid base64 {text:?}"));
        acc = acc << 6 | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// === slapd set-up ===

/// `examples/slapd.conf.in` filled in for one instance.
fn slapd_conf(dir: &Path, admin_password: &str, tls: bool, extra: &str) -> String {
    let dir = dir.display().to_string();
    let tls_lines = if tls {
        format!(
            "TLSCACertificateFile \"{dir}/ca.pem\"\n\
             TLSCertificateFile \"{dir}/server.pem\"\n\
             TLSCertificateKeyFile \"{dir}/server.key\""
        )
    } else {
        String::new()
    };
    SLAPD_CONF_TEMPLATE
        .replace("@DIR@", &dir)
        .replace("@ROOTPW@", admin_password)
        .replace("@TLS@", &tls_lines)
        .replace("@EXTRA@", extra)
}

/// A throwaway CA and a server certificate for 127.0.0.1/localhost, made with the openssl CLI.
/// EC P-256 keys: generated in milliseconds. The extensions are what rustls/webpki insist on.
pub fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    write_file(
        dir,
        "server.ext",
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    );
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509", "-new", "-nodes"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=coursegate test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
        [
            &["req", "-new", "-nodes"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
            &["-subj", "/CN=localhost"],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("run openssl: {e}; {INSTALL_HINT}"));
        check_output(&format!("openssl {}", args.join(" ")), &out);
    }
}

/// Panics, saying how to install them, if slapd or the OpenLDAP client tools are missing.
fn require_tools(tls: bool) {
    let mut missing: Vec<&str> = Vec::new();
    if !Path::new(SLAPD).is_file() {
        missing.push(SLAPD);
    }
    let tools: &[&str] = if tls {
        &[
            "ldapsearch",
            "ldapadd",
            "ldapmodify",
            "ldapwhoami",
            "openssl",
        ]
    } else {
        &["ldapsearch", "ldapadd", "ldapmodify", "ldapwhoami"]
    };
    missing.extend(tools.iter().filter(|tool| !on_path(tool)));
    assert!(
        missing.is_empty(),
        "the integration tests need a real OpenLDAP server, but {} is missing: {INSTALL_HINT}",
        missing.join(", ")
    );
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// A port on 127.0.0.1 that is free right now, below Linux's ephemeral range (32768–60999) so
/// that outgoing connections do not take it, and not handed out before in this process.
fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    loop {
        let port = 20000 + (random_u64() % 12000) as u16;
        if !handed_out.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; the rest tells calls apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Runs `cmd` with `input` on its stdin and its output captured.
pub fn run_with_input(mut cmd: Command, input: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {:?}: {e}; {INSTALL_HINT}", cmd.get_program()));
    // Feed stdin from another thread: the tool prints a line per entry, and with a large input
    // both pipes fill up and each side would wait for the other.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let input = input.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("wait for the LDAP tool");
    writer
        .join()
        .expect("stdin writer thread")
        .expect("write LDIF to the LDAP tool");
    output
}

fn check_output(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what}\nfailed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === files and the coursegate binary ===

/// Writes `contents` to `dir/name` (creating parent directories) and returns the path.
pub fn write_file(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// The `coursegate` binary cargo built for these tests.
pub fn coursegate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_coursegate"))
}

/// `coursegate -c <config> <args…>`, ready to run; add env or stdin as needed.
pub fn coursegate_command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(coursegate_bin());
    cmd.arg("-c").arg(config).args(args).stdin(Stdio::null());
    cmd
}

/// Runs `coursegate -c <config> <args…>` to completion and returns its exit status and output.
/// Kills it and panics after [`COURSEGATE_TIMEOUT`], so a hang fails the test instead of CI.
pub fn run_coursegate(config: &Path, args: &[&str]) -> Output {
    run_with_timeout(coursegate_command(config, args), COURSEGATE_TIMEOUT)
}

/// Runs `cmd` with stdout/stderr captured; kills it and panics after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    // Drain both pipes concurrently, or a chatty child blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "{:?} did not finish within {timeout:?}; stderr:\n{}",
                cmd.get_program(),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}
