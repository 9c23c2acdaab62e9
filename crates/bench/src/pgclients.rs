//! PostgreSQL's CPU split by whose work it did: each backend serves one
//! client connection, and its process title names the client's address
//! (`postgres: [CLUSTER: ]USER DB 127.0.0.1(PORT) STATE`); the port is matched to the
//! sockets the services' processes hold (`/proc/PID/fd` and
//! `/proc/net/tcp{,6}`). The server's own processes (checkpointer, WAL
//! writer, autovacuum…) are `server`; backends of clients that are not the
//! bench's processes are `other clients`.
//!
//! The CPU of each live process comes from `/proc/PID/schedstat` (ns, not
//! the 10 ms ticks of `stat`), so the split of a one-second run is not
//! mostly rounding. Backends that exit between two snapshots drop out of
//! the split (their time lands in the postmaster's reaped children, which
//! the `postgresql` group counts).

use std::collections::{BTreeMap, HashMap, HashSet};

/// What a backend's title names as its client's TCP port, if it is a
/// backend of a TCP client (not a Unix socket, not a background process).
pub(crate) fn client_port(title: &str) -> Option<u16> {
    let title = title.trim_end_matches(['\0', ' ']);
    let rest = title.strip_prefix("postgres: ")?;
    // [CLUSTER: ]USER DB HOST(PORT) STATE: the first word that is HOST(PORT).
    rest.split_whitespace().find_map(|word| {
        let (host, port) = word.strip_suffix(')')?.rsplit_once('(')?;
        if host.is_empty() {
            return None;
        }
        port.parse().ok()
    })
}

/// Socket inode → local port, from the text of `/proc/net/tcp` or `tcp6`.
pub(crate) fn socket_ports(table: &str) -> HashMap<u64, u16> {
    let mut ports = HashMap::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else { continue };
        let Some((_, port)) = local.rsplit_once(':') else { continue };
        if let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), inode.parse::<u64>()) {
            if inode != 0 {
                ports.insert(inode, port);
            }
        }
    }
    ports
}

/// The socket inodes process `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let target = target.to_string_lossy();
        if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
            if let Ok(inode) = inode.parse() {
                inodes.insert(inode);
            }
        }
    }
    inodes
}

/// CPU seconds of a live process from `/proc/PID/schedstat` (its first field, ns).
fn schedstat_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    Some(text.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
}

/// One live PostgreSQL process at one moment: whose work it did, and its CPU seconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Backend {
    pub(crate) owner: String,
    pub(crate) seconds: f64,
}

/// Which of `clients` (name, pid) holds each local TCP port now.
pub(crate) fn port_owners(clients: &[(String, u32)]) -> HashMap<u16, String> {
    let mut inode_ports = HashMap::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        inode_ports.extend(socket_ports(&std::fs::read_to_string(table).unwrap_or_default()));
    }
    let mut owners = HashMap::new();
    for (name, pid) in clients {
        for inode in socket_inodes(*pid) {
            if let Some(port) = inode_ports.get(&inode) {
                owners.insert(*port, name.clone());
            }
        }
    }
    owners
}

/// The PostgreSQL process `pid` now: whose connection it serves (by its
/// title's client port, looked up in `owners`) and its CPU seconds.
pub(crate) fn backend(pid: u32, owners: &HashMap<u16, String>) -> Option<Backend> {
    let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let owner = match client_port(&String::from_utf8_lossy(&title)) {
        Some(port) => owners.get(&port).map_or("other clients", String::as_str),
        None => "server",
    };
    Some(Backend { owner: owner.to_owned(), seconds: schedstat_seconds(pid)? })
}

/// The CPU seconds each owner's backends spent between two snapshots: per
/// process, so a connection is counted once, for the owner the later
/// snapshot names; a process that started in between counts whole.
pub(crate) fn spent_by_owner(before: &BTreeMap<u32, Backend>, after: &BTreeMap<u32, Backend>) -> BTreeMap<String, f64> {
    let mut spent = BTreeMap::new();
    for (pid, later) in after {
        let earlier = before.get(pid).map_or(0.0, |b| b.seconds);
        *spent.entry(later.owner.clone()).or_default() += (later.seconds - earlier).max(0.0);
    }
    spent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_title_names_its_client_port_and_a_background_process_none() {
        assert_eq!(client_port("postgres: postgres fleetpatch_bench_1 127.0.0.1(43210) idle\0\0"), Some(43210));
        assert_eq!(client_port("postgres: postgres db [::1](5050) UPDATE waiting"), Some(5050));
        assert_eq!(
            client_port("postgres: 15/main: postgres fleetpatch_bench_1 127.0.0.1(40122) idle\0\0"),
            Some(40122),
            "with cluster_name set"
        );
        assert_eq!(client_port("postgres: 15/main: postgres db 127.0.0.1(x) idle"), None);
        assert_eq!(client_port("postgres: postgres db [local] idle"), None, "a Unix socket has no port");
        assert_eq!(client_port("postgres: 15/main: checkpointer "), None);
        assert_eq!(client_port("postgres: 15/main: autovacuum launcher"), None);
        assert_eq!(client_port("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql"), None);
    }

    #[test]
    fn each_backend_counts_once_for_its_later_owner() {
        let backend = |owner: &str, seconds: f64| Backend { owner: owner.to_owned(), seconds };
        let before = BTreeMap::from([(10, backend("collector", 1.0)), (11, backend("server", 5.0))]);
        let after = BTreeMap::from([
            (10, backend("collector", 1.5)),
            (11, backend("server", 5.25)),
            // Opened in between: all of it counts.
            (12, backend("scheduler", 0.125)),
        ]);
        let spent = spent_by_owner(&before, &after);
        assert_eq!(spent["collector"], 0.5);
        assert_eq!(spent["server"], 0.25);
        assert_eq!(spent["scheduler"], 0.125);
        // A process gone by the later snapshot is not in the split.
        assert_eq!(spent_by_owner(&after, &before).get("scheduler"), None);
    }

    #[test]
    fn the_tcp_table_maps_socket_inodes_to_local_ports() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   104        0 31337 1 0 100 0 0 10 0\n\
           1: 0100007F:A8CA 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 20 4 30 10 -1\n\
           2: 0100007F:A8CB 0100007F:1538 06 00000000:00000000 03:00000F9B 00000000     0        0 0 3 0\n";
        let ports = socket_ports(table);
        assert_eq!(ports.get(&31337), Some(&5432), "the listener");
        assert_eq!(ports.get(&4242), Some(&0xA8CA), "a client's end");
        assert_eq!(ports.len(), 2, "a TIME_WAIT entry has no inode: {ports:?}");
    }
}
