//! A real Active Directory domain controller for the tests: Samba's AD DC, provisioned in a temp
//! dir.
//!
//! [`SambaDc::start`] makes a throwaway CA, a server certificate for the IP address `127.0.0.1`
//! only (so `ldaps://localhost` must be refused) and a second, unrelated CA; provisions a domain
//! `REGION.TEST` (`DC=region,DC=test`) with `samba-tool domain provision --server-role=dc
//! --dns-backend=NONE --use-rfc2307`, bound to `lo`, with the certificate as `tls
//! keyfile/certfile/cafile`; and runs `samba -i -M single` on `127.0.0.1:389/636` (its ports are
//! fixed). Only the LDAP server runs (`server services = ldap`): it is what coursegate talks to,
//! it starts in about a second, and no Kerberos, DNS or SMB port is taken on the test machine.
//! `ldb:nosync` skips fsync in the throwaway database (about 3 ms instead of 15 ms per added
//! user); `ldap server require strong auth = yes` (Samba's default, set explicitly) refuses
//! simple binds without TLS, as AD does.
//!
//! Then it creates, over LDAPS as `Administrator`: `OU=People`, `OU=Groups`, `OU=Services`; the
//! service account [`SERVICE_DN`] (UPN [`SERVICE_UPN`], a password, enabled) with the right to
//! write only the `member` attribute of groups under `OU=Groups` — the delegation an AD admin
//! gives such an account ("modify group membership"; set with `samba-tool dsacl`). Like any
//! authenticated user it may read users and groups.
//!
//! `samba -i` terminates when its standard input closes. The DC keeps that pipe, so Samba goes
//! away with the test process however it ends — also when it is killed — and never outlives the
//! run. The ports are fixed, so one DC runs per machine at a time: a lock file in the temp dir
//! serializes concurrent test runs, and a port that something else holds is a clear failure.
//!
//! State is always read back with OpenLDAP's command-line tools as `Administrator` over LDAPS
//! ([`SambaDc::admin_tool`]), never through coursegate's own LDAP code. Needs root (ports below
//! 1024) and the Debian packages `samba samba-ad-dc samba-ad-provision winbind` plus `ldap-utils`
//! and `openssl`; a missing one is a failure that says how to install it, never a skipped test.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common::{Entry, base64_encode, parse_ldif, run_with_input, write_file};

pub const REALM: &str = "REGION.TEST";
pub const DOMAIN_DN: &str = "DC=region,DC=test";
pub const PEOPLE_OU: &str = "OU=People,DC=region,DC=test";
pub const GROUPS_OU: &str = "OU=Groups,DC=region,DC=test";
pub const SERVICES_OU: &str = "OU=Services,DC=region,DC=test";
pub const SERVICE_DN: &str = "CN=svc-coursegate,OU=Services,DC=region,DC=test";
pub const SERVICE_UPN: &str = "svc-coursegate@region.test";
/// Meets AD's default complexity rules (three of: upper case, lower case, digit, symbol).
pub const SERVICE_PASSWORD: &str = "Kurs-Grind-2026";
pub const LDAPS_URL: &str = "ldaps://127.0.0.1";
pub const LDAP_URL: &str = "ldap://127.0.0.1";
/// The recommended user filter for Active Directory (README): people by `sAMAccountName`,
/// disabled accounts (userAccountControl bit 2) excluded.
pub const AD_USER_FILTER: &str = "(&(objectCategory=person)(sAMAccountName={user})(!(userAccountControl:1.2.840.113556.1.4.803:=2)))";
/// `userAccountControl` of an enabled account without a password (NORMAL_ACCOUNT |
/// PASSWD_NOTREQD): test users never log on, and skipping password hashing keeps bulk adds fast.
pub const UAC_ENABLED_NO_PASSWORD: u32 = 544;
/// `userAccountControl` with ACCOUNTDISABLE (2) set: how an AD admin disables an account.
pub const UAC_DISABLED: u32 = 514;

const INSTALL_HINT: &str = "install them with: sudo apt-get install samba samba-ad-dc \
                            samba-ad-provision winbind ldap-utils openssl (or run scripts/test.sh, \
                            which does)";
/// Samba's LDAP server ports (LDAP, LDAPS, global catalog, global catalog over TLS).
const PORTS: [u16; 4] = [389, 636, 3268, 3269];
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long to wait for another test run's DC to finish.
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
/// schemaIDGUID of the `member` attribute: the object of the "write members" permission.
const MEMBER_ATTRIBUTE_GUID: &str = "bf9679c0-0de6-11d0-a285-00aa003049e2";

/// A running Samba AD DC; stopped when dropped (or when the test process ends, see the module
/// docs).
pub struct SambaDc {
    dir: TempDir,
    child: Child,
    /// Samba's standard input: closing it ends Samba.
    stdin: Option<ChildStdin>,
    admin_password: String,
    /// Held while the DC runs: the ports are fixed, one DC per machine.
    _lock: File,
    pub provision_time: Duration,
    pub start_time: Duration,
}

/// A test account: `sAMAccountName` and `cn` (the RDN, which may hold commas and non-ASCII).
#[derive(Debug, Clone)]
pub struct AdUser {
    pub sam: String,
    pub cn: String,
}

impl AdUser {
    pub fn new(sam: &str, cn: &str) -> AdUser {
        AdUser {
            sam: sam.to_string(),
            cn: cn.to_string(),
        }
    }
}

// === impl SambaDc ===

impl SambaDc {
    pub fn start() -> SambaDc {
        require_tools();
        let lock = lock_the_ports();
        for port in PORTS {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            assert!(
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
                "something already listens on 127.0.0.1:{port}, which the Samba AD DC of the \
                 tests needs (its ports are fixed): stop it (a system samba-ad-dc or slapd \
                 service? see `ss -ltnp`) and run the tests again"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("coursegate-samba-")
            .tempdir()
            .expect("create the Samba temp dir");
        make_certificates(dir.path());
        let admin_password = format!("Adm-{:016x}-9z", random_u64());

        let started = Instant::now();
        let d = dir.path().display().to_string();
        let out = samba_command("samba-tool")
            .args([
                "domain",
                "provision",
                "--server-role=dc",
                "--dns-backend=NONE",
            ])
            .args(["--use-rfc2307", "--realm", REALM, "--domain=REGION"])
            .args(["--host-name=dc1", "--adminpass", &admin_password])
            .arg(format!("--targetdir={d}/samba"))
            .args(smb_options(&d).iter().map(|o| format!("--option={o}")))
            .output()
            .unwrap_or_else(|e| panic!("run samba-tool: {e}; {INSTALL_HINT}"));
        check(&out, "samba-tool domain provision");
        let provision_time = started.elapsed();

        let started = Instant::now();
        let log = File::create(dir.path().join("samba.out")).expect("create samba.out");
        let mut child = samba_command("samba")
            .args(["-i", "-M", "single", "-s"])
            .arg(dir.path().join("samba/etc/smb.conf"))
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("dup samba.out"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("run samba: {e}; {INSTALL_HINT}"));
        let stdin = child.stdin.take();
        let mut dc = SambaDc {
            dir,
            child,
            stdin,
            admin_password,
            _lock: lock,
            provision_time,
            start_time: Duration::ZERO,
        };
        dc.wait_until_ready();
        dc.start_time = started.elapsed();
        dc.populate();
        dc
    }

    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll samba") {
                panic!(
                    "samba exited ({status}) while starting:\n{}",
                    self.log_tail()
                );
            }
            let out = self
                .admin_tool("ldapsearch")
                .args(["-LLL", "-b", "", "-s", "base", "(objectClass=*)", "1.1"])
                .output()
                .expect("run ldapsearch");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Samba did not answer over LDAPS within {START_TIMEOUT:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The OUs, the service account and its delegation (module docs).
    fn populate(&self) {
        let mut ldif = String::new();
        for ou in [PEOPLE_OU, GROUPS_OU, SERVICES_OU] {
            writeln!(ldif, "dn: {ou}\nobjectClass: organizationalUnit\n").unwrap();
        }
        write!(
            ldif,
            "dn: {SERVICE_DN}\nobjectClass: user\nsAMAccountName: svc-coursegate\n\
             userPrincipalName: {SERVICE_UPN}\nunicodePwd:: {}\nuserAccountControl: 512\n",
            unicode_pwd(SERVICE_PASSWORD)
        )
        .unwrap();
        self.add_ldif(&ldif);
        let sid = self.sid_of(SERVICE_DN);
        let out = samba_command("samba-tool")
            .args(["dsacl", "set", "-H"])
            .arg(self.dir.path().join("samba/private/sam.ldb"))
            .arg(format!("--objectdn={GROUPS_OU}"))
            .arg(format!("--sddl=(OA;CI;WP;{MEMBER_ATTRIBUTE_GUID};;{sid})"))
            .output()
            .expect("run samba-tool dsacl");
        check(&out, "samba-tool dsacl set");
    }

    /// The PEM file of the CA that issued the DC's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The PEM file of a CA that has nothing to do with the DC.
    pub fn unrelated_ca_file(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// An OpenLDAP client tool bound as `Administrator` over LDAPS, trusting only the test CA.
    pub fn admin_tool(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        // Not LDAPNOINIT: it would also make the tools ignore the LDAPTLS_* variables.
        cmd.env("LDAPTLS_CACERT", self.ca_file())
            .env("LDAPTLS_REQCERT", "demand")
            .env_remove("LDAPTLS_CACERTDIR")
            .args(["-x", "-H", LDAPS_URL, "-D"])
            .arg(format!("Administrator@{REALM}"))
            .args(["-w", &self.admin_password]);
        cmd
    }

    pub fn add_ldif(&self, ldif: &str) {
        let out = run_with_input(self.admin_tool("ldapadd"), ldif);
        check(&out, "ldapadd");
    }

    pub fn modify_ldif(&self, ldif: &str) {
        let out = run_with_input(self.admin_tool("ldapmodify"), ldif);
        check(&out, "ldapmodify");
    }

    /// Adds enabled accounts (no password, `mail` = sam@region.test) under `ou` with one
    /// `ldapadd`; returns their DNs in the form the DC prints them.
    pub fn add_users(&self, ou: &str, users: &[AdUser]) -> Vec<String> {
        let mut ldif = String::new();
        let mut dns = Vec::new();
        for u in users {
            let dn = format!("CN={},{ou}", escape_rdn_value(&u.cn));
            ldif.push_str(&ldif_line("dn", &dn));
            ldif.push_str("objectClass: user\n");
            ldif.push_str(&ldif_line("sAMAccountName", &u.sam));
            ldif.push_str(&ldif_line("mail", &format!("{}@region.test", u.sam)));
            writeln!(ldif, "userAccountControl: {UAC_ENABLED_NO_PASSWORD}\n").unwrap();
            dns.push(dn);
        }
        self.add_ldif(&ldif);
        dns
    }

    /// Adds an OU under the domain (for the bulk accounts).
    pub fn add_ou(&self, dn: &str) {
        self.add_ldif(&format!("dn: {dn}\nobjectClass: organizationalUnit\n"));
    }

    /// Adds a global security group `cn` under `OU=Groups` with `members`; returns its DN.
    pub fn add_group(&self, cn: &str, members: &[String]) -> String {
        let dn = format!("CN={},{GROUPS_OU}", escape_rdn_value(cn));
        let mut ldif = ldif_line("dn", &dn);
        ldif.push_str("objectClass: group\n");
        ldif.push_str(&ldif_line("sAMAccountName", &ascii_sam(cn)));
        for m in members {
            ldif.push_str(&ldif_line("member", m));
        }
        self.add_ldif(&ldif);
        dn
    }

    /// Adds `member` to `group` as the admin (a hand-added member).
    pub fn add_member(&self, group: &str, member: &str) {
        self.modify_ldif(&format!(
            "{}changetype: modify\nadd: member\n{}-\n",
            ldif_line("dn", group),
            ldif_line("member", member)
        ));
    }

    /// Sets an account's `userAccountControl` (e.g. [`UAC_DISABLED`]).
    pub fn set_account_control(&self, dn: &str, value: u32) {
        self.modify_ldif(&format!(
            "{}changetype: modify\nreplace: userAccountControl\nuserAccountControl: {value}\n-\n",
            ldif_line("dn", dn)
        ));
    }

    /// The `member` values of `group` as the DC prints them. Samba does not limit the values
    /// per read (MaxValRange), so one read returns them all; a ranged answer fails the test
    /// rather than being counted short.
    pub fn members(&self, group: &str) -> BTreeSet<String> {
        let entries = self.search(group, "base", "(objectClass=*)", &["member"]);
        assert_eq!(entries.len(), 1, "no group {group}");
        assert!(
            !entries[0]
                .attrs
                .iter()
                .any(|(a, _)| a.to_ascii_lowercase().starts_with("member;range=")),
            "the DC returned member values in ranges; the harness expects all at once"
        );
        entries[0]
            .values("member")
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// `ldapsearch` as the admin (paged, so any number of entries); `scope` is `base`, `one` or
    /// `sub`. Panics on any error.
    pub fn search(&self, base: &str, scope: &str, filter: &str, attrs: &[&str]) -> Vec<Entry> {
        let out = self
            .admin_tool("ldapsearch")
            .args(["-LLL", "-o", "ldif-wrap=no", "-E", "pr=500/noprompt"])
            .args(["-b", base, "-s", scope, filter])
            .args(attrs)
            .output()
            .unwrap_or_else(|e| panic!("run ldapsearch: {e}; {INSTALL_HINT}"));
        check(&out, &format!("ldapsearch -b {base} {filter}"));
        let text = String::from_utf8(out.stdout).expect("ldapsearch output is UTF-8");
        // Paged output ends with a `# pagedresults` comment per page; parse_ldif skips comments.
        parse_ldif(&text)
    }

    /// The `objectSid` of `dn` in its string form (S-1-5-21-…).
    fn sid_of(&self, dn: &str) -> String {
        // Read raw: parse_ldif decodes base64 values as UTF-8, which a binary SID is not.
        let out = self
            .admin_tool("ldapsearch")
            .args(["-LLL", "-o", "ldif-wrap=no", "-b", dn, "-s", "base"])
            .args(["(objectClass=*)", "objectSid"])
            .output()
            .expect("run ldapsearch");
        check(&out, &format!("ldapsearch objectSid of {dn}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let b64 = text
            .lines()
            .find_map(|l| l.strip_prefix("objectSid:: "))
            .expect("objectSid is base64 in LDIF");
        sid_string(&crate::common::base64_decode(b64.trim()))
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        for name in ["samba.out", "samba.log"] {
            let content = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            write!(text, "--- {name}\n{tail}\n").unwrap();
        }
        text
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        // End of input ends `samba -i`; kill it if it does not go within a few seconds.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === set-up helpers ===

/// The smb.conf options of the test DC (module docs).
fn smb_options(dir: &str) -> Vec<String> {
    [
        "netbios name=DC1",
        "interfaces=lo",
        "bind interfaces only=yes",
        "server services=ldap",
        "ldap server require strong auth=yes",
        "tls enabled=yes",
        "ldb:nosync=true",
    ]
    .iter()
    .map(|o| o.to_string())
    .chain([
        format!("tls keyfile={dir}/server.key"),
        format!("tls certfile={dir}/server.pem"),
        format!("tls cafile={dir}/ca.pem"),
        format!("log file={dir}/samba.log"),
    ])
    .collect()
}

/// Panics, saying how to install them, if Samba or the LDAP tools are missing or we are not
/// root.
fn require_tools() {
    let mut missing: Vec<&str> = ["samba", "samba-tool", "ldapsearch", "ldapadd", "ldapmodify"]
        .into_iter()
        .filter(|t| !on_path(t))
        .collect();
    if !on_path("openssl") {
        missing.push("openssl");
    }
    // Debian ships the schema files samba-tool provisions from in their own package.
    if !Path::new("/usr/share/samba/setup/ad-schema").is_dir() {
        missing.push("/usr/share/samba/setup/ad-schema (samba-ad-provision)");
    }
    assert!(
        missing.is_empty(),
        "the Active Directory tests need a real Samba AD DC, but {} is missing: {INSTALL_HINT}",
        missing.join(", ")
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or("0");
    assert_eq!(
        uid, "0",
        "the Active Directory tests run a Samba AD DC on ports 389 and 636 and need root \
         (CI runs as root; locally: sudo -E cargo nextest run)"
    );
}

fn on_path(program: &str) -> bool {
    find_program(program).is_some()
}

/// `program` on `PATH`, or in `/usr/sbin` or `/sbin` (where Debian puts `samba`, and which a
/// non-root `PATH` often lacks).
fn find_program(program: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

/// A command for a Samba program, found as [`find_program`] does.
fn samba_command(program: &str) -> Command {
    Command::new(find_program(program).unwrap_or_else(|| PathBuf::from(program)))
}

/// Takes the machine-wide lock for the DC's fixed ports, waiting for another run to finish.
fn lock_the_ports() -> File {
    let path = std::env::temp_dir().join("coursegate-samba-ad.lock");
    let file = File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        match file.try_lock() {
            Ok(()) => return file,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!(
                "another test run's Samba AD DC held {} for {LOCK_TIMEOUT:?} ({e})",
                path.display()
            ),
        }
    }
}

/// The test CA, a server certificate for IP 127.0.0.1 only, and an unrelated CA (openssl CLI,
/// EC P-256: milliseconds). Samba insists that its key file is private.
fn make_certificates(dir: &Path) {
    write_file(
        dir,
        "server.ext",
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1\n",
    );
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1";
    let ca_ext =
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign";
    for args in [
        format!(
            "req -x509 -new -nodes {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=coursegate-test-region-CA {ca_ext}"
        ),
        format!(
            "req -x509 -new -nodes {ec} -keyout other-ca.key -out other-ca.pem -days 2 -subj /CN=unrelated-CA {ca_ext}"
        ),
        format!("req -new -nodes {ec} -keyout server.key -out server.csr -subj /CN=dc1.region.test"),
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -out server.pem -days 2 -extfile server.ext"
            .to_string(),
    ] {
        let out = Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("run openssl: {e}; {INSTALL_HINT}"));
        check(&out, &format!("openssl {args}"));
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod server.key");
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// === values ===

/// Escapes an RDN value the way Active Directory and Samba print DNs: `\` before `, + " \ < >
/// ; =`, a leading `#` and leading or trailing spaces; non-ASCII as it is.
pub fn escape_rdn_value(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::new();
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One LDIF line, base64 where RFC 2849 requires it (non-ASCII and the like).
pub fn ldif_line(attr: &str, value: &str) -> String {
    crate::common::ldif_line(attr, value)
}

/// `unicodePwd`: the password in double quotes, UTF-16LE, base64 (AD's format).
fn unicode_pwd(password: &str) -> String {
    let bytes: Vec<u8> = format!("\"{password}\"")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    base64_encode(&bytes)
}

/// A unique `sAMAccountName` for a group: ASCII letters, digits and dashes, 20 characters at
/// most.
fn ascii_sam(cn: &str) -> String {
    let sam: String = cn
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(15)
        .collect();
    format!("{sam}-{:04x}", random_u64() % 0x10000)
}

/// A binary SID (MS-DTYP 2.4.2) as `S-1-5-21-…`.
fn sid_string(b: &[u8]) -> String {
    assert!(b.len() >= 8, "short SID");
    let authority = b[2..8].iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
    let mut s = format!("S-{}-{authority}", b[0]);
    for i in 0..usize::from(b[1]) {
        let sub = u32::from_le_bytes(b[8 + 4 * i..12 + 4 * i].try_into().expect("4 bytes"));
        write!(s, "-{sub}").unwrap();
    }
    s
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
