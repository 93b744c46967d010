//! The tarpc wire between the proxy and its runtimes, followed frame by frame in the socket
//! tracepoints (`net.rs`) at both ends: the head of every frame goes to userspace, which
//! decodes it (`observer/src/model/requests/wire.rs`) and joins calls to their answers (the
//! proxy's calls) or a served call's request to its response (a runtime's). No uprobe: the
//! socket tracepoints already run on every send and receive.
//!
//! tarpc 0.24's TCP transport is `tokio_util::codec::LengthDelimitedCodec` (a 4-byte
//! big-endian length, then the frame) around bincode (tokio-serde 0.8, varint encoding).
//! Its `FramedWrite` writes one contiguous buffer (`writev` with one `iovec`) and its
//! `FramedRead` reads into one (`recvfrom`), so every call starts where the last one on the
//! same connection stopped; a frame, or its length, can straddle two calls: the state of each
//! direction of each connection is kept in `CONNS`.
//!
//! The buffer is the syscall's, read from the task's saved registers (`bpf_task_pt_regs`):
//! the tracepoints pass only the socket and the byte count. `sock_sendmsg_nosec` and
//! `sock_recvmsg_nosec` fire inside the syscall, after the bytes were copied (net/socket.c).
//!
//! Which connections are tarpc: a connection's first frame in the direction that opens it
//! (the proxy sends first, a runtime receives first: `net.rs`, `opens_wire`) must have a
//! length tarpc accepts (8 MiB, the codec's default limit); an HTTP head ("HTTP", "GET ",
//! 0x48...) or anything else fails that on its first call and is marked `OTHER` (one lookup
//! from then on). The other direction is followed only on connections the opening one is.
//! Userspace checks every head it gets (a request's trace id must be a call's; an answer's
//! request id must be one sent, or received, on that connection), so a misread never makes a
//! number.

use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::map,
    maps::LruHashMap,
};
use observer_common::{event::WireFrame, role, stat, wire, Kind, Peer, WIRE_HEAD};

use crate::{bump, send, OBSERVER_STATS};

/// A frame's length prefix.
const LEN: usize = 4;
/// `LengthDelimitedCodec`'s default `max_frame_length` (tokio-util 0.6, `length_delimited.rs`).
const MAX_FRAME: u32 = 8 * 1024 * 1024;
/// Steps through one call's bytes: up to three per frame (its length, its head, its body
/// skipped), so 21 frames at once. tarpc's dispatch writes what accumulated since its last
/// flush, about one frame per call in flight: 16 wrk connections fit. Past that the
/// direction starts again at the next call (`stat::WIRE_RESYNCS`).
const MAX_STEPS: u32 = 64;

/// x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
const SYS_READ: u64 = 0;
const SYS_WRITE: u64 = 1;
const SYS_READV: u64 = 19;
const SYS_WRITEV: u64 = 20;
const SYS_SENDTO: u64 = 44;
const SYS_RECVFROM: u64 = 45;

/// `Conn::state`.
const FOLLOW: u32 = 1;
const OTHER: u32 = 2;
/// A client's HTTP connection to the proxy, named by hyper's `recv_msg` (`client_connection`):
/// its sends are response heads and bodies (`http.rs`).
const HTTP: u32 = 3;

/// Where one direction of one connection is between two socket calls.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stream {
    /// Bytes of `head` collected for the frame being read (its length prefix first).
    have: u32,
    /// Bytes of the current frame's body still to come past its head.
    skip: u32,
    /// The current frame's length, once its prefix is in.
    frame_len: u32,
    /// The call being followed: where in its bytes, how many, frames seen in it.
    pos: u32,
    n: u32,
    frames: u32,
    /// A frame's length prefix and head; room for a read at any `have <= LEN + WIRE_HEAD`.
    head: [u8; 2 * (LEN + WIRE_HEAD)],
}

/// One connection of the proxy or a runtime: whether it is tarpc's, and both its directions
/// (`wire::SENT`, `wire::RECEIVED`). One entry, so a socket call costs one lookup.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Conn {
    state: u32,
    /// `role::*` of the process it is in.
    role: u32,
    /// Its peer (the runtime, or in a runtime the proxy), read once when the connection is
    /// first seen.
    peer: Peer,
    dirs: [Stream; 2],
}

const NEW_STREAM: Stream = Stream {
    have: 0,
    skip: 0,
    frame_len: 0,
    pos: 0,
    n: 0,
    frames: 0,
    head: [0; 2 * (LEN + WIRE_HEAD)],
};

/// Every connection the tracepoints saw open (`follow`), by its `struct sock`.
#[map]
static CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(8192, 0);

/// `struct iovec` (include/uapi/linux/uio.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct Iovec {
    base: u64,
    len: u64,
}

/// The syscall's arguments and number this code needs, as `struct pt_regs` keeps them on
/// x86_64 (arch/x86/include/asm/ptrace.h: `dx` at byte 96, `si` at 104, `orig_ax` at 120).
struct SyscallRegs {
    rdx: u64,
    rsi: u64,
    orig_rax: u64,
}

const PT_REGS_RDX: usize = 96;
const PT_REGS_RSI: usize = 104;
const PT_REGS_ORIG_RAX: usize = 120;

/// The user buffer of the socket call this task is in.
struct Buffer {
    /// Where its (first) segment starts.
    base: u64,
    /// Whether that segment holds all `n` bytes of the call.
    whole: bool,
    /// The segment's length.
    first: u64,
}

/// The user buffer of the socket call this task is in (`None`: a call this does not read).
fn buffer(n: u32) -> Result<Option<Buffer>, i64> {
    // Direct loads, not bpf_probe_read_kernel: `bpf_task_pt_regs` returns a typed pointer
    // (PTR_TO_BTF_ID of `struct pt_regs`), so the verifier checks each field against the
    // kernel's BTF and the JIT guards the loads (kernel/bpf/verifier.c, BPF_PROBE_MEM); no
    // helper call on every followed socket call.
    // SAFETY: the helpers take the current task's BTF pointer; the fields are read in place.
    let regs = unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const u8;
        let field = |at: usize| core::ptr::read_volatile(regs.add(at) as *const u64);
        SyscallRegs {
            rdx: field(PT_REGS_RDX),
            rsi: field(PT_REGS_RSI),
            orig_rax: field(PT_REGS_ORIG_RAX),
        }
    };
    Ok(match regs.orig_rax {
        SYS_READ | SYS_WRITE | SYS_SENDTO | SYS_RECVFROM => Some(Buffer {
            base: regs.rsi,
            whole: true,
            first: regs.rdx,
        }),
        SYS_READV | SYS_WRITEV => {
            // SAFETY: bpf_probe_read_user checks the address.
            let iov: Iovec =
                unsafe { aya_ebpf::helpers::bpf_probe_read_user(regs.rsi as *const Iovec) }?;
            Some(Buffer {
                base: iov.base,
                whole: regs.rdx == 1 || iov.len >= n as u64,
                first: iov.len,
            })
        }
        _ => None,
    })
}

/// Which end of tarpc connections a process is.
#[derive(Clone, Copy)]
pub struct Side {
    /// `role::*`.
    pub role: u32,
    /// The direction that opens a connection: `wire::SENT` for the client (the proxy),
    /// `wire::RECEIVED` for the server (a runtime).
    pub opens: u32,
}

/// Follows `n` bytes sent or received on the connection `sock` (`direction`) of a process on
/// `side`. `peer` reads the connection's peer, once, when it is first seen. `Ok(true)`: a
/// tarpc connection, followed.
pub fn follow(
    sock: u64,
    direction: u32,
    side: Side,
    n: u32,
    peer: impl FnOnce() -> Peer,
) -> Result<bool, i64> {
    let (c, fresh) = match CONNS.get_ptr_mut(sock) {
        Some(c) => (c, false),
        // The client sends first on a tarpc connection (a request): in the proxy, a connection
        // first seen receiving is a client's (HTTP) or was open before the attach; in a
        // runtime, one first seen sending was.
        None if direction != side.opens => return Ok(false),
        None => {
            let new = Conn {
                state: FOLLOW,
                role: side.role,
                peer: peer(),
                dirs: [NEW_STREAM; 2],
            };
            CONNS.insert(sock, new, 0)?;
            let Some(c) = CONNS.get_ptr_mut(sock) else {
                return Ok(false);
            };
            (c, true)
        }
    };
    // SAFETY: an entry of this map; only this connection's calls write it, one at a time
    // (tokio's I/O on one socket is one task's).
    let c = unsafe { &mut *c };
    if c.state == OTHER || (c.state == HTTP && direction != wire::SENT) {
        return Ok(false);
    }
    let b = buffer(n)?;
    if c.state == HTTP {
        if let Some(b) = b {
            crate::http::response(sock, b.base, b.first.min(u64::from(n)))?;
        }
        return Ok(false);
    }
    let Some(Buffer {
        base: buf,
        whole: true,
        ..
    }) = b
    else {
        if fresh {
            // A connection whose first call is not one buffer: not tarpc's framed transport.
            c.state = OTHER;
            return Ok(false);
        }
        resync(c, direction)?;
        return Ok(true);
    };
    let d = if direction == wire::SENT { 0 } else { 1 };
    let at_boundary = c.dirs[d].have == 0 && c.dirs[d].skip == 0;
    if !fresh && at_boundary {
        match one_frame(buf, n, sock, direction, c) {
            ONE_FRAME => return Ok(true),
            STEP => {}
            e => return Err(e),
        }
    }
    let st = &mut c.dirs[d];
    st.pos = 0;
    st.n = n;
    st.frames = 0;
    let mut walk = Walk {
        st: st as *mut Stream,
        buf,
        sock,
        direction,
        fresh: fresh as u32,
        verdict: 0,
        role: c.role,
        peer: c.peer,
    };
    // bpf_loop (kernel 5.17): the verifier checks the step once, not once per iteration.
    // SAFETY: the callback takes the context this frame passes, which outlives the loop.
    unsafe {
        bpf_loop(
            MAX_STEPS,
            walk_step as *mut c_void,
            &mut walk as *mut Walk as *mut c_void,
            0,
        );
    }
    match walk.verdict {
        VERDICT_OTHER => {
            c.state = OTHER;
            return Ok(false);
        }
        VERDICT_LOST => resync(c, direction)?,
        _ if volatile(&st.pos) < volatile(&st.n) => resync(c, direction)?,
        _ => {}
    }
    Ok(true)
}

/// The common call, sent or received at a frame boundary: exactly one whole frame (tarpc's
/// dispatch writes each frame as it comes when nothing else waits, and its reader reads what
/// one answer sent). Its head goes out with one read and no step, no write to the
/// connection's entry. `ONE_FRAME`: done; `STEP`: not such a call, for the stepping walk;
/// else the error (an `i64`, not a `Result`: a BPF call takes five registers and no sret slot). A fresh connection
/// always steps: its first frame's length is what tells tarpc's connections from others.
/// Not inlined: `follow`'s own frame is near the BPF stack's 512 bytes.
#[inline(never)]
fn one_frame(buf: u64, n: u32, sock: u64, direction: u32, c: &Conn) -> i64 {
    if n <= LEN as u32 {
        return STEP;
    }
    // The length prefix and the head in one read (each read of user memory is a helper call
    // with its checks, ~90 ns here under `perf`): as many bytes as the call has, up to both.
    // Zeroed a word at a time (no `memset` call); room for both, rounded up to words.
    let mut words = core::mem::MaybeUninit::<[u64; (LEN + WIRE_HEAD).div_ceil(8)]>::uninit();
    let bytes = crate::as_bytes(crate::zero_words(&mut words));
    let mut m = n;
    if m > (LEN + WIRE_HEAD) as u32 {
        m = (LEN + WIRE_HEAD) as u32;
    }
    // SAFETY: at most the array's size into it; the source is checked by the helper.
    let r =
        unsafe { bpf_probe_read_user(bytes.as_mut_ptr() as *mut c_void, m, buf as *const c_void) };
    if r != 0 {
        return STEP;
    }
    let frame_len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if u64::from(frame_len) + LEN as u64 != u64::from(n) {
        return STEP;
    }
    let mut head_len = frame_len;
    if head_len > WIRE_HEAD as u32 {
        head_len = WIRE_HEAD as u32;
    }
    // Past `head_len` the array holds zeros: no byte after the frame's is read.
    let sent = send_frame(
        Frame {
            sock,
            direction,
            peer: c.peer,
            role: c.role,
        },
        frame_len,
        head_len,
        &bytes[LEN..LEN + WIRE_HEAD],
    );
    match sent {
        Ok(()) => ONE_FRAME,
        Err(e) => e.min(-1),
    }
}

/// Which connection and direction a frame was seen on, and by which side.
struct Frame {
    sock: u64,
    direction: u32,
    peer: Peer,
    role: u32,
}

/// Sends a frame's head to userspace: its connection, its length, and the first `WIRE_HEAD`
/// bytes past its prefix (`head`), of which `head_len` are the frame's.
#[inline(always)]
fn send_frame(f: Frame, frame_len: u32, head_len: u32, head: &[u8]) -> Result<(), i64> {
    send(Kind::WireFrame, |rec: &mut WireFrame| {
        rec.sock = f.sock;
        rec.frame_len = frame_len;
        rec.direction = f.direction;
        rec.peer = f.peer;
        rec.head_len = head_len;
        rec.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        rec.role = f.role;
        rec.head.copy_from_slice(head);
        Ok(())
    })
}

/// `one_frame`'s answers besides an error.
const ONE_FRAME: i64 = 1;
const STEP: i64 = 0;

/// `Walk::verdict`.
const VERDICT_OTHER: u32 = 1;
const VERDICT_LOST: u32 = 2;

/// What each step of `bpf_loop` needs of the call being followed.
#[repr(C)]
struct Walk {
    st: *mut Stream,
    buf: u64,
    sock: u64,
    direction: u32,
    fresh: u32,
    verdict: u32,
    role: u32,
    peer: Peer,
}

/// One iteration of `bpf_loop`: 0 goes on, 1 stops.
extern "C" fn walk_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `follow` passes its `Walk`, alive for the whole loop, whose `st` points into
    // this connection's map entry.
    let w = unsafe { &mut *(ctx as *mut Walk) };
    let st = unsafe { &mut *w.st };
    match step(st, w) {
        Ok(Step::More) => 0,
        Ok(Step::Done) => 1,
        Ok(Step::Other) => {
            w.verdict = VERDICT_OTHER;
            1
        }
        Ok(Step::Lost) | Err(_) => {
            w.verdict = VERDICT_LOST;
            1
        }
    }
}

enum Step {
    More,
    Done,
    /// Not a tarpc connection.
    Other,
    Lost,
}

/// Reads a field of the stream's map value anew: each step starts from what the map holds.
#[inline(always)]
fn volatile(v: &u32) -> u32 {
    // SAFETY: a field of a live map value.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn set(v: &mut u32, x: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(v, x) }
}

/// One step through a call's bytes: past a frame body, or into a frame's length and head,
/// read together: one read of user memory per frame, not one for its length and one for its
/// head (each read is a helper call with its checks, `one_frame`).
#[inline(always)]
fn step(st: &mut Stream, w: &Walk) -> Result<Step, i64> {
    let pos = volatile(&st.pos);
    let n = volatile(&st.n);
    if pos >= n {
        return Ok(Step::Done);
    }
    let skip = volatile(&st.skip);
    if skip > 0 {
        let adv = skip.min(n - pos);
        set(&mut st.skip, skip - adv);
        set(&mut st.pos, pos + adv);
        return Ok(Step::More);
    }
    let have = volatile(&st.have);
    let mut frame_len = volatile(&st.frame_len);
    // Before the length is in, as much as a head can be: a frame shorter than that leaves
    // the rest of the read to the next frame, read again by the next step.
    let want = if (have as usize) < LEN {
        (LEN + WIRE_HEAD) as u32
    } else {
        (LEN as u32) + frame_len.min(WIRE_HEAD as u32)
    };
    if have >= want || have > (LEN + WIRE_HEAD) as u32 {
        return Ok(Step::Lost);
    }
    let mut take = (want - have).min(n - pos);
    if take > (LEN + WIRE_HEAD) as u32 {
        take = (LEN + WIRE_HEAD) as u32;
    }
    // SAFETY: `have` and `take` are at most `LEN + WIRE_HEAD` (checked above, in the
    // verifier's view too), inside `head`; the source is checked by the helper.
    let r = unsafe {
        bpf_probe_read_user(
            st.head.as_mut_ptr().add(have as usize) as *mut c_void,
            take,
            (w.buf + pos as u64) as *const c_void,
        )
    };
    if r != 0 {
        return Ok(Step::Lost);
    }
    let got = have + take;
    if (have as usize) < LEN {
        if (got as usize) < LEN {
            // The call ended inside the length: the next call goes on from here.
            set(&mut st.have, got);
            set(&mut st.pos, pos + take);
            return Ok(Step::Done);
        }
        let len = u32::from_be_bytes([st.head[0], st.head[1], st.head[2], st.head[3]]);
        if len > MAX_FRAME {
            if w.fresh != 0 && volatile(&st.frames) == 0 {
                // Not tarpc: an HTTP head, or another protocol.
                return Ok(Step::Other);
            }
            return Ok(Step::Lost);
        }
        set(&mut st.frame_len, len);
        frame_len = len;
    }
    // Where this frame's head ends in `head`; bytes read past it are the next frame's.
    let end = (LEN as u32) + frame_len.min(WIRE_HEAD as u32);
    if got < end {
        // The call ended inside the head: the next call goes on from here.
        set(&mut st.have, got);
        set(&mut st.pos, pos + take);
        return Ok(Step::Done);
    }
    set(&mut st.pos, pos + (end - have));
    set(&mut st.have, 0);
    if frame_len == 0 {
        return Ok(Step::More);
    }
    let head_len = end - LEN as u32;
    let head = &st.head;
    // `head` past `head_len` may hold the next frame's first bytes: userspace reads
    // `head_len` of them (`observer::decode`).
    send_frame(
        Frame {
            sock: w.sock,
            direction: w.direction,
            peer: w.peer,
            role: w.role,
        },
        frame_len,
        head_len,
        &head[LEN..LEN + WIRE_HEAD],
    )?;
    set(&mut st.skip, frame_len - head_len);
    let frames = volatile(&st.frames);
    set(&mut st.frames, frames + 1);
    Ok(Step::More)
}

/// hyper handed over a request that came in on `sock` (`http.rs`): the proxy's sends on it
/// are its responses from now on. Only connections hyper serves are: a request's client
/// connection is named by the request, not guessed from bytes that look like HTTP.
pub fn client_connection(sock: u64) -> Result<(), i64> {
    if let Some(c) = CONNS.get_ptr_mut(sock) {
        // SAFETY: as in `follow`.
        let c = unsafe { &mut *c };
        // A tarpc connection is never a client's: a stale name is not taken.
        if c.state != FOLLOW {
            c.state = HTTP;
        }
        return Ok(());
    }
    let new = Conn {
        state: HTTP,
        role: role::PROXY,
        peer: Peer {
            addr: [0; 16],
            port: 0,
            family: 0,
            _pad: 0,
        },
        dirs: [NEW_STREAM; 2],
    };
    CONNS.insert(sock, new, 0)?;
    Ok(())
}

/// The connection ended (in the proxy or a runtime): its entry goes, and userspace ends what
/// was in flight on it.
pub fn end(sock: u64) -> Result<(), i64> {
    // SAFETY: a copy out of the entry.
    let (state, peer, role) = match unsafe { CONNS.get(sock) } {
        Some(c) => (c.state, c.peer, c.role),
        None => return Ok(()),
    };
    // Any entry goes: the kernel reuses a closed socket's memory for a new one, which must
    // not inherit what this one was (a client's, or not tarpc's).
    let _ = CONNS.remove(sock);
    if state != FOLLOW {
        return Ok(());
    }
    // The entry's role routes the end (its proxy's calls, or a runtime's served ones); `tgid`
    // is whoever ended it, not always the connection's process (`net.rs`, `sock_close`).
    send(Kind::WireEnd, |rec: &mut WireFrame| {
        rec.sock = sock;
        rec.direction = wire::RECEIVED;
        rec.peer = peer;
        rec.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        rec.role = role;
        Ok(())
    })
}

/// Lost the frame boundaries of one direction: it starts again at the next call, which on
/// tarpc's framed transport begins a frame.
fn resync(c: &mut Conn, direction: u32) -> Result<(), i64> {
    bump(&OBSERVER_STATS, stat::WIRE_RESYNCS);
    let st = if direction == wire::SENT {
        &mut c.dirs[0]
    } else {
        &mut c.dirs[1]
    };
    st.have = 0;
    st.skip = 0;
    Ok(())
}
