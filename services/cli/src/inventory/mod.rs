//! Targets from outside the rollout file: a CSV file (`--targets-csv`) and
//! an Ansible-style INI inventory (`--inventory`). Both formats are
//! documented in `docs/rollout-file.md`.
//!
//! Parsing is strict: every mistake names the file and the line. Secrets
//! are never taken from an inventory (`ansible_password` is refused), nor
//! their locations (`ansible_ssh_private_key_file`, `credential_ref`): a
//! target names a credential an administrator defined (`credential` column,
//! `fleetpatch_credential` variable).

use std::collections::{BTreeMap, HashMap};

use fleetpatch_scheduler::api::{TargetRequest, TRANSPORTS};

use crate::rollout_file::{ImportedTarget, InputError};

mod csv_file;
pub use csv_file::parse_csv;

/// The label that records a host's inventory groups.
pub const GROUP_LABEL: &str = "group";
/// Most hosts one Ansible host pattern may expand to (`h[0:99999][0:99999]`
/// is refused, not expanded).
pub const MAX_HOSTS_PER_PATTERN: u64 = 100_000;
/// What to do instead of naming a secret's location.
const NAME_A_CREDENTIAL: &str = "fleetpatch never takes a secret's location from an inventory: ask an administrator \
     to define a named credential ([credentials.<name>] where the workers run) and name it";

/// What is wrong with a header, a line, a cell, a variable or a host
/// pattern of a CSV file or an inventory: the message of the
/// [`InputError`] that names the file and the line. Each names the value at
/// fault, except a credential name that is not one (it may be a pasted
/// secret) and a secret variable's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("the header {header:?} has no host column; the first line names the columns, e.g. host,transport,port")]
    NoHostColumn { header: String },
    #[error("column {number} of the header has no name")]
    UnnamedColumn { number: usize },
    #[error("column {column:?} appears twice (columns {first} and {second})")]
    DuplicateColumn { column: String, first: usize, second: usize },
    #[error("a quoted cell is not closed (a cell cannot span lines)")]
    UnclosedCell,
    #[error("a quoted value is not closed")]
    UnclosedValue,
    #[error(
        "{key}: fleetpatch never takes a secret from an inventory; ask an administrator to define a named \
         credential ([credentials.<name>] where the workers run) and name it with fleetpatch_credential=<name>"
    )]
    Secret { key: String },
    #[error("{key:?}={value:?} has no usable variable name")]
    VariableName { key: String, value: String },
    #[error("{raw:?} is not a port number (1-65535)")]
    Port { raw: String },
    /// The port of Ansible's `host:port` shorthand.
    #[error("{pattern:?}: {port:?} is not a port number (1-65535)")]
    PatternPort { pattern: String, port: String },
    #[error("{raw:?} is not a transport; use one of {}", TRANSPORTS.join(", "))]
    Transport { raw: String },
    #[error(
        "must name a credential an administrator defined (lower-case letters, digits, '-' or '_'), never a \
         secret or its location"
    )]
    NotACredentialName,
    #[error("{pattern:?}: {problem}")]
    Range { pattern: String, problem: RangeProblem },
    #[error(
        "{pattern:?} expands to {count} hosts; one host pattern may give at most {max} (split it, or use a CSV \
         file)",
        max = MAX_HOSTS_PER_PATTERN
    )]
    TooManyHosts { pattern: String, count: u64 },
}

/// What is wrong with a numeric host range (`web[01:20]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeProblem {
    #[error("[ without ]")]
    Unclosed,
    #[error("a range is [first:last]")]
    NoColon,
    #[error("only numeric ranges such as [01:20] are supported")]
    NotNumeric,
    #[error("the range must go up")]
    Descending,
}

// ------------------------------------------------------------------ INI inventory

/// One host of an inventory while it is being read.
struct InventoryHost {
    line: usize,
    /// Groups the host is listed under, in order of appearance.
    groups: Vec<String>,
    vars: BTreeMap<String, String>,
}

/// Reads an Ansible-style INI inventory: `[group]` sections of host lines
/// (`name key=value ...`), `[group:vars]` and `[group:children]`
/// sections. Each host becomes one target labelled `group=<groups>`.
pub fn parse_inventory(text: &str, file: &str, default_transport: &str) -> Result<Vec<ImportedTarget>, InputError> {
    enum Section {
        Hosts(Option<String>),
        Vars(String),
        Children(String),
    }
    let mut section = Section::Hosts(None);
    let mut hosts: Vec<(String, InventoryHost)> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut group_vars: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    // child group -> parent groups
    let mut parents: HashMap<String, Vec<String>> = HashMap::new();
    let mut known_groups: Vec<String> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let error = |message: String| InputError::at_line(file, number, message);
        if let Some(header) = trimmed.strip_prefix('[') {
            let name = header
                .strip_suffix(']')
                .ok_or_else(|| error(format!("section header {trimmed:?} is not closed with ]")))?
                .trim();
            let (group, kind) = name.split_once(':').unwrap_or((name, ""));
            if group.is_empty() || group.contains(char::is_whitespace) {
                return Err(error(format!("{group:?} is not a group name")));
            }
            if !known_groups.iter().any(|g| g == group) {
                known_groups.push(group.to_owned());
            }
            section = match kind {
                "" => Section::Hosts(Some(group.to_owned())),
                "vars" => Section::Vars(group.to_owned()),
                "children" => Section::Children(group.to_owned()),
                other => {
                    return Err(error(format!(
                        "[{group}:{other}]: sections are [group], [group:vars] or [group:children]"
                    )))
                }
            };
            continue;
        }
        let tokens = split_inventory_line(trimmed).map_err(|e| error(e.to_string()))?;
        match &section {
            Section::Vars(group) => {
                let [pair] = tokens.as_slice() else {
                    return Err(error(format!("[{group}:vars] lines are one key=value each")));
                };
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| error(format!("{pair:?} in [{group}:vars] is not key=value")))?;
                check_var(key, value).map_err(|e| error(e.to_string()))?;
                group_vars.entry(group.clone()).or_default().insert(key.to_owned(), value.to_owned());
            }
            Section::Children(group) => {
                let [child] = tokens.as_slice() else {
                    return Err(error(format!("[{group}:children] lines name one group each")));
                };
                parents.entry(child.clone()).or_default().push(group.clone());
            }
            Section::Hosts(group) => {
                let (pattern, pairs) = tokens.split_first().expect("a non-empty line has a token");
                let mut vars = BTreeMap::new();
                for pair in pairs {
                    let (key, value) = pair
                        .split_once('=')
                        .ok_or_else(|| error(format!("{pair:?} after the host is not key=value")))?;
                    check_var(key, value).map_err(|e| error(e.to_string()))?;
                    vars.insert(key.to_owned(), value.to_owned());
                }
                let (pattern, port) = split_host_port(pattern).map_err(|e| error(e.to_string()))?;
                if let Some(port) = port {
                    vars.entry("ansible_port".into()).or_insert(port);
                }
                for name in expand_host_range(pattern).map_err(|e| error(e.to_string()))? {
                    let host = match index_of.get(&name) {
                        Some(i) => &mut hosts[*i].1,
                        None => {
                            index_of.insert(name.clone(), hosts.len());
                            let host = InventoryHost { line: number, groups: vec![], vars: BTreeMap::new() };
                            hosts.push((name.clone(), host));
                            &mut hosts.last_mut().expect("just pushed").1
                        }
                    };
                    if let Some(group) = group {
                        if !host.groups.contains(group) {
                            host.groups.push(group.clone());
                        }
                    }
                    host.vars.extend(vars.clone());
                }
            }
        }
    }
    for child in parents.keys() {
        if !known_groups.contains(child) {
            let parent = &parents[child][0];
            return Err(InputError::in_file(file, format!("[{parent}:children] names {child:?}, which is no group")));
        }
    }
    let mut targets = Vec::with_capacity(hosts.len());
    for (name, host) in hosts {
        let groups = with_ancestors(&host.groups, &parents);
        // Precedence: host > its own groups > their parent groups > all.
        let mut vars = group_vars.get("all").cloned().unwrap_or_default();
        for group in groups.iter().rev() {
            vars.extend(group_vars.get(group).cloned().unwrap_or_default());
        }
        vars.extend(host.vars);
        let error = |message: String| InputError::at_line(file, host.line, message);
        let mut target = new_target(default_transport);
        target.host = name.clone();
        for (key, value) in vars {
            match key.as_str() {
                "ansible_host" | "ansible_ssh_host" => {
                    target.labels.insert("inventory_name".into(), name.clone());
                    target.host = value;
                }
                "ansible_port" | "ansible_ssh_port" => {
                    target.port = Some(parse_port(&value).map_err(|e| error(format!("{key}: {e}")))?)
                }
                "ansible_user" | "ansible_ssh_user" => {
                    // The label the workers read the login user of a key credential from.
                    target.labels.insert("user".into(), value);
                }
                "ansible_connection" => {
                    target.transport = match value.as_str() {
                        "ssh" | "paramiko" | "smart" => "ssh".into(),
                        "winrm" | "psrp" | "smb" => "smb".into(),
                        "sim" => "sim".into(),
                        other => {
                            return Err(error(format!(
                                "ansible_connection={other} has no fleetpatch transport (ssh, winrm/psrp → smb)"
                            )))
                        }
                    }
                }
                "ansible_ssh_private_key_file" | "ansible_private_key_file" => {
                    return Err(error(format!("{key}: {NAME_A_CREDENTIAL} with fleetpatch_credential=<name>")));
                }
                "fleetpatch_transport" => {
                    target.transport = check_transport(&value).map_err(|e| error(format!("{key}: {e}")))?
                }
                "fleetpatch_credential" => {
                    target.credential = Some(check_credential_name(&value).map_err(|e| error(format!("{key}: {e}")))?)
                }
                "fleetpatch_credential_ref" => {
                    return Err(error(format!("{key}: {NAME_A_CREDENTIAL} with fleetpatch_credential=<name>")));
                }
                "fleetpatch_wave" => target.wave = Some(value),
                other if other.starts_with("ansible_") => {}
                _ => {
                    target.labels.insert(key, value);
                }
            }
        }
        if !groups.is_empty() {
            target.labels.insert(GROUP_LABEL.into(), groups.join(","));
        }
        targets.push(ImportedTarget { target, origin: format!("{file} line {}", host.line) });
    }
    Ok(targets)
}

/// A host's groups followed by their parents (through `[parent:children]`).
fn with_ancestors(groups: &[String], parents: &HashMap<String, Vec<String>>) -> Vec<String> {
    let mut all: Vec<String> = groups.to_vec();
    let mut next = 0;
    while next < all.len() {
        for parent in parents.get(&all[next]).into_iter().flatten() {
            if !all.contains(parent) {
                all.push(parent.clone());
            }
        }
        next += 1;
    }
    all
}

/// Secrets never come from an inventory.
fn check_var(key: &str, value: &str) -> Result<(), InventoryError> {
    const SECRETS: [&str; 6] = [
        "ansible_password",
        "ansible_ssh_pass",
        "ansible_ssh_password",
        "ansible_become_password",
        "ansible_become_pass",
        "ansible_winrm_password",
    ];
    if SECRETS.contains(&key) {
        return Err(InventoryError::Secret { key: key.to_owned() });
    }
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(InventoryError::VariableName { key: key.to_owned(), value: value.to_owned() });
    }
    Ok(())
}

/// `host:2222` (Ansible's port shorthand); IPv6 addresses are left alone.
fn split_host_port(pattern: &str) -> Result<(&str, Option<String>), InventoryError> {
    match pattern.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && !port.contains(']') => {
            parse_port(port)
                .map_err(|_| InventoryError::PatternPort { pattern: pattern.to_owned(), port: port.to_owned() })?;
            Ok((host, Some(port.to_owned())))
        }
        _ => Ok((pattern, None)),
    }
}

/// Expands Ansible's numeric host ranges: `web[01:03].example.com` →
/// web01, web02, web03 (the width of the first bound is kept). A pattern
/// that would give more than [`MAX_HOSTS_PER_PATTERN`] hosts is refused
/// before anything is expanded.
fn expand_host_range(pattern: &str) -> Result<Vec<String>, InventoryError> {
    let count = count_hosts(pattern)?;
    if count > MAX_HOSTS_PER_PATTERN {
        return Err(InventoryError::TooManyHosts { pattern: pattern.to_owned(), count });
    }
    expand_ranges(pattern)
}

/// How many hosts `pattern` expands to (saturating), without expanding it.
fn count_hosts(pattern: &str) -> Result<u64, InventoryError> {
    let range_error = |problem| InventoryError::Range { pattern: pattern.to_owned(), problem };
    let mut count = 1u64;
    let mut rest = pattern;
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']').map(|c| open + c).ok_or_else(|| range_error(RangeProblem::Unclosed))?;
        let (start, end) = rest[open + 1..close].split_once(':').ok_or_else(|| range_error(RangeProblem::NoColon))?;
        let parse = |bound: &str| bound.parse::<u64>().map_err(|_| range_error(RangeProblem::NotNumeric));
        let (first, last) = (parse(start)?, parse(end)?);
        if last < first {
            return Err(range_error(RangeProblem::Descending));
        }
        count = count.saturating_mul((last - first).saturating_add(1));
        rest = &rest[close + 1..];
    }
    Ok(count)
}

fn expand_ranges(pattern: &str) -> Result<Vec<String>, InventoryError> {
    let range_error = |problem| InventoryError::Range { pattern: pattern.to_owned(), problem };
    let Some(open) = pattern.find('[') else {
        return Ok(vec![pattern.to_owned()]);
    };
    let close = pattern[open..].find(']').map(|c| open + c).ok_or_else(|| range_error(RangeProblem::Unclosed))?;
    let (prefix, range, suffix) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let (start, end) = range.split_once(':').ok_or_else(|| range_error(RangeProblem::NoColon))?;
    let parse = |bound: &str| bound.parse::<u64>().map_err(|_| range_error(RangeProblem::NotNumeric));
    let (first, last) = (parse(start)?, parse(end)?);
    if last < first {
        return Err(range_error(RangeProblem::Descending));
    }
    let width = if start.starts_with('0') { start.len() } else { 0 };
    let mut hosts = Vec::new();
    for n in first..=last {
        for rest in expand_ranges(suffix)? {
            hosts.push(format!("{prefix}{n:0width$}{rest}"));
        }
    }
    Ok(hosts)
}

/// Splits an inventory line on whitespace; quotes group, `#` starts a comment.
fn split_inventory_line(line: &str) -> Result<Vec<String>, InventoryError> {
    let mut tokens = Vec::new();
    let mut token = String::new();
    let mut quote: Option<char> = None;
    let mut in_token = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => token.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_token = true;
            }
            (None, '#') if !in_token => break,
            (None, c) if c.is_whitespace() => {
                if in_token {
                    tokens.push(std::mem::take(&mut token));
                    in_token = false;
                }
            }
            (None, c) => {
                token.push(c);
                in_token = true;
            }
        }
    }
    if quote.is_some() {
        return Err(InventoryError::UnclosedValue);
    }
    if in_token {
        tokens.push(token);
    }
    Ok(tokens)
}

// ------------------------------------------------------------------ shared

fn new_target(transport: &str) -> TargetRequest {
    TargetRequest {
        host: String::new(),
        port: None,
        transport: transport.to_owned(),
        labels: BTreeMap::new(),
        credential: None,
        credential_ref: None,
        wave: None,
    }
}

fn parse_port(raw: &str) -> Result<u16, InventoryError> {
    match raw.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(InventoryError::Port { raw: raw.to_owned() }),
    }
}

pub fn check_transport(raw: &str) -> Result<String, InventoryError> {
    if TRANSPORTS.contains(&raw) {
        Ok(raw.to_owned())
    } else {
        Err(InventoryError::Transport { raw: raw.to_owned() })
    }
}

/// A credential name as `[credentials.<name>]` allows it; the text of a
/// cell that is not one is not repeated (it may be a pasted secret).
pub fn check_credential_name(raw: &str) -> Result<String, InventoryError> {
    if fleetpatch_runtime::credentials::is_valid_name(raw) {
        Ok(raw.to_owned())
    } else {
        Err(InventoryError::NotACredentialName)
    }
}

#[cfg(test)]
mod tests {
    use super::csv_file::check_header;
    use super::*;

    const INVENTORY: &str = "\
# Ansible-style inventory
bastion.example.com

[web]
web[01:03].example.com ansible_user=deploy
web-legacy:2200 ansible_host=10.0.0.9 datacenter=\"eu west\" # inline comment

[db]
db1.example.com ansible_port=2222 ansible_user=root fleetpatch_wave=canary
web01.example.com

[web:vars]
fleetpatch_credential=web-key
datacenter=eu-central

[prod:children]
web
db

[all:vars]
ansible_port=22
ansible_python_interpreter=/usr/bin/python3
";

    #[test]
    fn an_inventory_gives_one_target_per_host_with_its_groups() {
        let targets = parse_inventory(INVENTORY, "hosts.ini", "ssh").unwrap();
        let hosts: Vec<&str> = targets.iter().map(|t| t.target.host.as_str()).collect();
        assert_eq!(
            hosts,
            vec![
                "bastion.example.com",
                "web01.example.com",
                "web02.example.com",
                "web03.example.com",
                "10.0.0.9",
                "db1.example.com"
            ]
        );
        let bastion = &targets[0].target;
        assert_eq!((bastion.port, bastion.transport.as_str()), (Some(22), "ssh"));
        assert!(!bastion.labels.contains_key(GROUP_LABEL), "ungrouped hosts have no group label");
        assert!(!bastion.labels.contains_key("ansible_python_interpreter"));
        let web01 = &targets[1];
        assert_eq!(web01.origin, "hosts.ini line 5");
        assert_eq!(web01.target.labels[GROUP_LABEL], "web,db,prod");
        // ansible_user is the label the workers read a key credential's user from.
        assert_eq!(web01.target.labels["user"], "deploy");
        assert!(!web01.target.labels.contains_key("ssh.user"));
        assert_eq!(web01.target.labels["datacenter"], "eu-central");
        assert_eq!(web01.target.credential.as_deref(), Some("web-key"));
        let legacy = &targets[4].target;
        assert_eq!(legacy.port, Some(2200), "host:port shorthand");
        assert_eq!(legacy.labels["inventory_name"], "web-legacy");
        assert_eq!(legacy.labels["datacenter"], "eu west", "host vars win over group vars");
        let db1 = &targets[5].target;
        assert_eq!((db1.port, db1.wave.as_deref()), (Some(2222), Some("canary")));
        assert_eq!(db1.labels[GROUP_LABEL], "db,prod");
        assert_eq!(db1.credential, None);
    }

    #[test]
    fn an_inventory_refuses_secrets_and_names_the_line() {
        let error = parse_inventory("[web]\nh1 ansible_password=hunter2\n", "hosts.ini", "ssh").unwrap_err();
        let shown = error.to_string();
        assert!(shown.starts_with("hosts.ini:2: ansible_password: fleetpatch never takes a secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "the secret is not repeated: {shown}");
    }

    #[test]
    fn inventory_mistakes_name_the_line() {
        let cases = [
            ("[web\nh1\n", "hosts.ini:1: section header \"[web\" is not closed with ]"),
            ("[web]\nh1 port\n", "hosts.ini:2: \"port\" after the host is not key=value"),
            ("[web]\nh1 ansible_port=ssh\n", "hosts.ini:2: ansible_port: \"ssh\" is not a port number (1-65535)"),
            ("[web]\nh[a:c]\n", "hosts.ini:2: \"h[a:c]\": only numeric ranges such as [01:20] are supported"),
            ("[web:hosts]\n", "hosts.ini:1: [web:hosts]: sections are [group], [group:vars] or [group:children]"),
            ("[all:children]\nnope\n", "hosts.ini: [all:children] names \"nope\", which is no group"),
            ("h1 ansible_connection=local\n", "hosts.ini:1: ansible_connection=local has no fleetpatch transport"),
            (
                "h1 ansible_ssh_private_key_file=/home/me/.ssh/id\n",
                "hosts.ini:1: ansible_ssh_private_key_file: fleetpatch never takes a secret's location",
            ),
            ("h1 fleetpatch_credential_ref=env:X\n", "hosts.ini:1: fleetpatch_credential_ref: fleetpatch never takes"),
            ("h1 fleetpatch_credential=Bad/Name\n", "hosts.ini:1: fleetpatch_credential: must name a credential"),
            (
                "[web]\nh[0:99999][0:99999]\n",
                "hosts.ini:2: \"h[0:99999][0:99999]\" expands to 10000000000 hosts; one host pattern may give at most \
                 100000",
            ),
            ("[web]\nh[0:100000]\n", "hosts.ini:2: \"h[0:100000]\" expands to 100001 hosts"),
        ];
        for (text, expected) in cases {
            let error = parse_inventory(text, "hosts.ini", "ssh").unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn inventory_errors_name_the_value() {
        assert_eq!(parse_port("0"), Err(InventoryError::Port { raw: "0".into() }));
        assert_eq!(parse_port("0").unwrap_err().to_string(), "\"0\" is not a port number (1-65535)");
        let error = split_host_port("web:99999").unwrap_err();
        assert_eq!(error.to_string(), "\"web:99999\": \"99999\" is not a port number (1-65535)");
        let error = expand_host_range("h[3:1]").unwrap_err();
        assert_eq!(error, InventoryError::Range { pattern: "h[3:1]".into(), problem: RangeProblem::Descending });
        assert_eq!(error.to_string(), "\"h[3:1]\": the range must go up");
        assert_eq!(expand_ranges("h[1:").unwrap_err().to_string(), "\"h[1:\": [ without ]");
        let error = check_transport("telnet").unwrap_err().to_string();
        assert_eq!(error, "\"telnet\" is not a transport; use one of sim, ssh, smb");
        let error = check_header(&["host".into(), "Site".into(), "site".into()]).unwrap_err();
        assert_eq!(error.to_string(), "column \"site\" appears twice (columns 2 and 3)");
    }

    #[test]
    fn windows_hosts_of_an_inventory_use_smb() {
        let targets = parse_inventory("[win]\nwin1 ansible_connection=winrm\n", "h.ini", "ssh").unwrap();
        assert_eq!(targets[0].target.transport, "smb");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;
    use crate::rollout_file::{parse, RolloutInput};

    fn example(name: &str) -> String {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name))
            .unwrap()
    }

    #[test]
    fn the_example_csv_and_inventory_merge_into_the_ssh_example() {
        let mut input = RolloutInput::new(parse(&example("rollout-ssh.yaml"), "rollout-ssh.yaml", false).unwrap(), "r");
        input.merge(parse_csv(&example("hosts.csv"), "hosts.csv", "sim").unwrap()).unwrap();
        input.merge(parse_inventory(&example("hosts.ini"), "hosts.ini", "ssh").unwrap()).unwrap();
        let hosts: Vec<&str> = input.request.targets.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts.len(), 3 + 3 + 5, "{hosts:?}");
        assert!(input.request.targets.iter().all(|t| t.transport == "ssh"));
        let db3 = input.request.targets.iter().find(|t| t.host == "db-03.example.com").unwrap();
        assert_eq!(db3.labels[GROUP_LABEL], "db,linux");
        assert_eq!(db3.credential.as_deref(), Some("db-ssh"), "host vars win over all:vars");
        let web5 = input.request.targets.iter().find(|t| t.host == "web05.example.com").unwrap();
        assert_eq!(web5.credential.as_deref(), Some("fleet-ssh"));
        assert_eq!(web5.labels["user"], "deploy");
        assert_eq!(web5.labels["site"], "paris");
    }
}
