//! The TCP sockets of a process's network namespace, from the kernel's sock_diag netlink
//! interface (sock_diag(7)), filtered by state in the kernel.
//!
//! Why not `/proc/<pid>/net/tcp{,6}`: it formats every socket of the namespace as text on each
//! read, TIME_WAIT ones included. In the demo, whose clients do not keep connections alive,
//! 12,071 TIME_WAIT sockets made one read cost 38 ms of kernel time, once a second (the runtime
//! peer scan, `procs`). A dump asking for ESTABLISHED or LISTEN sockets skips the others in the
//! kernel and sends the rest as binary records.
//!
//! A netlink socket answers for the network namespace it was created in, so the socket for a
//! target in another namespace is made on a short-lived thread that first enters it
//! (setns(2) with `CLONE_NEWNET` changes only the calling thread's namespace).

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;

pub use netlink_packet_sock_diag::inet::StateFlags;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening /proc/{pid}/ns/net: {source}")]
    Netns { pid: u32, source: std::io::Error },
    #[error("entering the network namespace of {pid} (setns): {source}")]
    Setns { pid: u32, source: std::io::Error },
    #[error("creating a NETLINK_SOCK_DIAG socket: {0}")]
    Socket(std::io::Error),
    #[error("sock_diag request: {0}")]
    Io(std::io::Error),
    #[error("sock_diag answered error {0} (is the kernel built with CONFIG_INET_DIAG?)")]
    Kernel(i32),
    #[error("undecodable sock_diag message: {0}")]
    Decode(String),
}

/// A TCP socket: its addresses and inode (the one `/proc/<pid>/fd` links name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub inode: u64,
}

/// A sock_diag socket in one network namespace.
pub struct Diag {
    netns: u64,
    socket: Socket,
    buf: Vec<u8>,
}

/// The inode of a process's network namespace (`/proc/<pid>/ns/net`), 0 if it is gone.
pub fn netns_of(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).map_or(0, |m| m.ino())
}

impl Diag {
    /// A sock_diag socket in the network namespace of `pid`.
    pub fn open(pid: u32) -> Result<Diag, Error> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|source| Error::Netns { pid, source })?;
        let netns = ns
            .metadata()
            .map_err(|source| Error::Netns { pid, source })?
            .ino();
        let own = std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino());
        let socket = if netns == own {
            Socket::new(NETLINK_SOCK_DIAG).map_err(Error::Socket)?
        } else {
            std::thread::scope(|s| {
                s.spawn(|| {
                    // SAFETY: setns on a namespace fd we hold; it changes only this thread,
                    // which ends right after making the socket.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(Error::Setns {
                            pid,
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    Socket::new(NETLINK_SOCK_DIAG).map_err(Error::Socket)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Error::Socket(std::io::Error::other(
                        "the thread making the socket panicked",
                    )))
                })
            })?
        };
        // A dump that never ends must not hang the watcher (it holds the model's lock): a
        // receive times out after a second, and the caller falls back to procfs.
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, passed by pointer with its size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(Error::Socket(std::io::Error::last_os_error()));
        }
        Ok(Diag {
            netns,
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// The network namespace (inode) it answers for.
    pub fn netns(&self) -> u64 {
        self.netns
    }

    /// The namespace's TCP sockets (IPv4 and IPv6) in one of `states`.
    pub fn tcp(&mut self, states: StateFlags) -> Result<Vec<TcpSocket>, Error> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, states.clone(), &mut out)?;
        }
        Ok(out)
    }

    fn dump(
        &mut self,
        family: u8,
        states: StateFlags,
        out: &mut Vec<TcpSocket>,
    ) -> Result<(), Error> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket
            .send_to(&bytes, &NetlinkAddr::new(0, 0), 0)
            .map_err(Error::Io)?;
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(Error::Io)?;
            if parse(&self.buf[..n], out)? {
                return Ok(());
            }
        }
    }
}

/// Decodes one datagram of a dump into `out`; true once the dump is done.
fn parse(mut datagram: &[u8], out: &mut Vec<TcpSocket>) -> Result<bool, Error> {
    while !datagram.is_empty() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(datagram)
            .map_err(|e| Error::Decode(e.to_string()))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let id = &r.header.socket_id;
                out.push(TcpSocket {
                    local: SocketAddr::new(id.source_address, id.source_port),
                    remote: SocketAddr::new(id.destination_address, id.destination_port),
                    inode: u64::from(r.header.inode),
                });
            }
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                return Err(Error::Kernel(e.code.map_or(0, |c| c.get())));
            }
            _ => {}
        }
        // Messages are 4-byte aligned (NLMSG_ALIGN).
        let step = (len + 3) & !3;
        if len == 0 || step > datagram.len() {
            break;
        }
        datagram = &datagram[step..];
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The kernel's own answer: a listener and a connection made here are in the dump, by
    /// state, with the inode their fd links name.
    #[test]
    fn lists_this_namespaces_listeners_and_connections_by_state() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener");
        let at = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(at).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let inode_of = |fd: i32| -> u64 {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            let s = link.to_string_lossy();
            s.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .parse()
                .unwrap_or_else(|_| panic!("{s} is a socket link"))
        };
        let mut d = Diag::open(std::process::id()).expect("a sock_diag socket");
        assert_eq!(d.netns(), netns_of(std::process::id()));
        let listening = d.tcp(StateFlags::LISTEN).expect("a LISTEN dump");
        let ours = listening
            .iter()
            .find(|s| s.local == at)
            .unwrap_or_else(|| panic!("{at} listening in {listening:?}"));
        assert_eq!(ours.inode, inode_of(listener.as_raw_fd()));
        assert!(!listening.iter().any(|s| s.remote.port() != 0));
        let established = d.tcp(StateFlags::ESTABLISHED).expect("an ESTABLISHED dump");
        let conn = established
            .iter()
            .find(|s| s.local == client.local_addr().unwrap())
            .unwrap_or_else(|| panic!("the client's connection in {established:?}"));
        assert_eq!(conn.remote, at);
        assert_eq!(conn.inode, inode_of(client.as_raw_fd()));
        assert!(!established
            .iter()
            .any(|s| s.local == at && s.remote.port() == 0));
    }

    /// A process in its own network namespace: the socket answers for that namespace (made on
    /// a thread that entered it), not for ours.
    #[test]
    fn answers_for_the_targets_namespace() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a listener");
        let at = listener.local_addr().unwrap();
        // A new network namespace whose process listens on the same address.
        let script = format!(
            "exec python3 -c 'import socket,time; s=socket.socket(); s.bind((\"0.0.0.0\",{})); s.listen(); time.sleep(30)'",
            at.port() + 1
        );
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sh", "-c", &script])
            .spawn()
            .expect("unshare --net (util-linux; run as root)");
        let pid = child.id();
        let mut found = Vec::new();
        for _ in 0..100 {
            if netns_of(pid) != netns_of(std::process::id()) {
                let mut d = Diag::open(pid).expect("a sock_diag socket in its namespace");
                assert_ne!(d.netns(), netns_of(std::process::id()));
                found = d.tcp(StateFlags::LISTEN).expect("a LISTEN dump");
                if !found.is_empty() {
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let ports: Vec<u16> = found.iter().map(|s| s.local.port()).collect();
        assert_eq!(ports, vec![at.port() + 1], "its listener, not ours ({at})");
    }

    #[test]
    fn a_gone_process_is_a_clear_error() {
        match Diag::open(u32::MAX) {
            Err(e @ Error::Netns { .. }) => assert!(e.to_string().contains("/proc/")),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a socket for no process"),
        }
    }
}
