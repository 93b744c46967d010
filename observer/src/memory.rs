//! Bounded reads of another process's memory, py-spy style: `process_vm_readv(2)`, which
//! neither stops the target (no ptrace attach) nor writes to it. Every reader has a byte budget,
//! so a walk over corrupt or racing data cannot follow pointers for long; every value read is
//! validated before it is followed (`string`).
//!
//! The target keeps running while it is read: a read may see a half-written value, or memory
//! freed since. Callers validate what they read and retry or give up; nothing here trusts it.

use observer_common::Layout;
use std::cell::Cell;
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReadError {
    #[error("{len} bytes at {addr:#x} could not be read (unmapped, or freed since)")]
    Fault { addr: u64, len: usize },
    #[error("the read budget of {budget} bytes is spent")]
    Budget { budget: u64 },
    #[error("a {what} at {addr:#x} does not validate: {why}")]
    Invalid {
        what: &'static str,
        addr: u64,
        why: String,
    },
}

/// Something target memory can be read from: a live process, or a test's fake.
pub trait Read {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError>;

    fn word(&self, addr: u64) -> Result<u64, ReadError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Reads memory as it is now, past any cache (to see whether something changed).
    fn read_now(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.read(addr, buf)
    }
}

const PAGE: u64 = 4096;

/// A walk's view of target memory one page at a time: each page is read once (one syscall
/// instead of one per field: a snapshot of a thousand apps makes thousands of small reads, most
/// in a few heap pages) and then served from here, so the walk also sees each page at one
/// moment. `read_now` goes past it. A page that cannot be read whole (the end of a mapping) is
/// read directly, as asked.
pub struct Pages<'a, M: Read> {
    inner: &'a M,
    pages: std::cell::RefCell<std::collections::HashMap<u64, Option<Box<[u8]>>>>,
}

impl<'a, M: Read> Pages<'a, M> {
    pub fn new(inner: &'a M) -> Self {
        Pages {
            inner,
            pages: Default::default(),
        }
    }
}

impl<M: Read> Read for Pages<'_, M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let end = addr.checked_add(buf.len() as u64).ok_or(ReadError::Fault {
            addr,
            len: buf.len(),
        })?;
        let mut pages = self.pages.borrow_mut();
        let mut at = addr;
        while at < end {
            let page = at & !(PAGE - 1);
            let cached = pages.entry(page).or_insert_with(|| {
                let mut p = vec![0u8; PAGE as usize].into_boxed_slice();
                self.inner.read(page, &mut p).ok().map(|_| p)
            });
            let Some(p) = cached else {
                drop(pages);
                return self.inner.read(addr, buf);
            };
            let upto = end.min(page + PAGE);
            let (from, to) = ((at - page) as usize, (upto - page) as usize);
            let into = (at - addr) as usize;
            buf[into..into + (to - from)].copy_from_slice(&p[from..to]);
            at = upto;
        }
        Ok(())
    }

    fn read_now(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.inner.read(addr, buf)
    }
}

/// A live process's memory, read through `process_vm_readv`, up to `budget` bytes in all.
pub struct ProcessMemory {
    pid: libc::pid_t,
    budget: u64,
    spent: Cell<u64>,
    /// A read was refused for the budget: every later one is too, so that a walk that
    /// swallows one failed read (trying layouts) still ends as out of budget.
    exhausted: Cell<bool>,
}

impl ProcessMemory {
    pub fn new(pid: u32, budget: u64) -> Self {
        ProcessMemory {
            pid: pid as libc::pid_t,
            budget,
            spent: Cell::new(0),
            exhausted: Cell::new(false),
        }
    }

    /// Bytes read so far (a snapshot's cost, for its self-metric).
    pub fn bytes_read(&self) -> u64 {
        self.spent.get()
    }
}

impl Read for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let spent = self.spent.get() + buf.len() as u64;
        if spent > self.budget || self.exhausted.get() {
            self.exhausted.set(true);
            return Err(ReadError::Budget {
                budget: self.budget,
            });
        }
        self.spent.set(spent);
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` is our own buffer of the length given; the kernel checks the remote
        // range against the target's mappings and fails (EFAULT) or reads short past them.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n as usize != buf.len() {
            return Err(ReadError::Fault {
                addr,
                len: buf.len(),
            });
        }
        Ok(())
    }
}

/// The bytes of the Rust `String` (or `Vec<u8>`) whose header is at `addr`, if its length is at
/// most `max_len` and its capacity holds it. A torn or freed header fails here, not later.
pub fn string(
    mem: &impl Read,
    addr: u64,
    lay: &Layout,
    max_len: usize,
) -> Result<Vec<u8>, ReadError> {
    let invalid = |why: String| ReadError::Invalid {
        what: "String",
        addr,
        why,
    };
    let len = mem.word(addr + lay.string_len)?;
    let ptr = mem.word(addr + lay.string_ptr)?;
    if len > max_len as u64 {
        return Err(invalid(format!("length {len} over {max_len}")));
    }
    // The capacity is the word that is neither the pointer nor the length.
    let cap_at = (0..3)
        .map(|i| i * 8)
        .find(|o| *o != lay.string_len && *o != lay.string_ptr)
        .expect("three words, two named");
    let cap = mem.word(addr + cap_at)?;
    if cap < len || cap > isize::MAX as u64 {
        return Err(invalid(format!("capacity {cap} below length {len}")));
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    if ptr == 0 || ptr.checked_add(len).is_none() {
        return Err(invalid(format!("pointer {ptr:#x}")));
    }
    let mut out = vec![0u8; len as usize];
    mem.read(ptr, &mut out)?;
    Ok(out)
}

/// Fake target memory for tests and the fuzz target: one region of bytes at `base`.
pub struct Region {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl Read for Region {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let fault = || ReadError::Fault {
            addr,
            len: buf.len(),
        };
        let start =
            usize::try_from(addr.checked_sub(self.base).ok_or_else(fault)?).map_err(|_| fault())?;
        let src = self
            .bytes
            .get(start..start.checked_add(buf.len()).ok_or_else(fault)?)
            .ok_or_else(fault)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A String header at 0x1000 (`{cap, ptr, len}` in the default layout) and its bytes at
    /// 0x1100.
    fn region(cap: u64, ptr: u64, len: u64, text: &[u8]) -> Region {
        let mut bytes = vec![0u8; 0x200];
        for (i, w) in [cap, ptr, len].iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        bytes[0x100..0x100 + text.len()].copy_from_slice(text);
        Region {
            base: 0x1000,
            bytes,
        }
    }

    /// A case: its name, the memory, and the bytes read or a part of the error.
    type Case = (&'static str, Region, Result<&'static [u8], &'static str>);

    #[test]
    fn strings_decode_or_fail_with_the_reason() {
        let lay = Layout::DEFAULT;
        let cases: &[Case] = &[
            ("plain", region(8, 0x1100, 5, b"app-1"), Ok(b"app-1")),
            ("empty", region(0, 1, 0, b""), Ok(b"")),
            (
                "too long",
                region(100, 0x1100, 65, b""),
                Err("length 65 over 64"),
            ),
            (
                "torn: cap below len",
                region(2, 0x1100, 5, b""),
                Err("capacity 2"),
            ),
            ("null pointer", region(8, 0, 5, b""), Err("pointer 0x0")),
            (
                "freed: unmapped bytes",
                region(8, 0x9000, 5, b""),
                Err("could not be read"),
            ),
        ];
        for (name, mem, want) in cases {
            let got = string(mem, 0x1000, &lay, 64);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(&g[..], *w, "{name}"),
                (Err(w), Err(e)) => assert!(e.to_string().contains(w), "{name}: {e}"),
                (w, g) => panic!("{name}: want {w:?}, got {g:?}"),
            }
        }
    }

    /// The default layout and process_vm_readv against a real String of this process, built
    /// by the same compiler as the observer (the proxy's layout is checked in tests/layout.rs).
    #[test]
    fn a_live_string_reads_back() {
        let s = String::from("5f3e7c2a-0b1d-4e8f-9a6c-3d2b1e0f4a5c");
        let me = ProcessMemory::new(std::process::id(), 4096);
        let got = string(&me, &s as *const String as u64, &Layout::DEFAULT, 64)
            .expect("our own String reads");
        assert_eq!(got, s.as_bytes());
        assert_eq!(me.bytes_read(), 24 + 36);
    }

    #[test]
    fn pages_serve_reads_once_and_read_now_goes_past_them() {
        let mut bytes = vec![0u8; 3 * 4096];
        bytes[4090..4100].copy_from_slice(b"0123456789");
        let mem = Region {
            base: 0x10_0000,
            bytes,
        };
        let pages = Pages::new(&mem);
        let mut b = [0u8; 10];
        pages
            .read(0x10_0000 + 4090, &mut b)
            .expect("across two pages");
        assert_eq!(&b, b"0123456789");
        // Past the region: a page that cannot be read whole is read as asked (and fails).
        assert!(pages.read(0x10_0000 + 3 * 4096 - 4, &mut b).is_err());
        assert!(pages.read_now(0x10_0000 + 4090, &mut b).is_ok());
    }

    #[test]
    fn the_budget_stops_a_walk() {
        let me = ProcessMemory::new(std::process::id(), 16);
        let x = 7u64;
        assert_eq!(me.word(&x as *const u64 as u64), Ok(7));
        assert_eq!(me.word(&x as *const u64 as u64), Ok(7));
        assert_eq!(
            me.word(&x as *const u64 as u64),
            Err(ReadError::Budget { budget: 16 })
        );
    }
}
