//! The per-socket outbound queue, bounded by bytes like a browser's `bufferedAmount`, and the
//! socket's write side.
//!
//! Producers never wait. A lane's turn hands the gate all the frames its socket gets at once
//! ([`Gate::write_through`]), written straight from the frames every socket shares when nothing
//! else waits ([`super::lanes`]). Replies and the node's other frames are queued with
//! [`Gate::push`] and flushed right away. Only [`super::writer`] calls these: every frame the
//! node sends goes through it. A write never waits: what the kernel does not take stays queued and
//! counted, the gate turns congested, and the session's writer finishes the job when the socket is
//! writable again. A frame that would pass the budget frees the queue and marks the gate
//! overflowed, so the session closes the socket with 4008: a client that stops reading keeps its
//! bytes counted and overflows instead of growing the node's memory.
//!
//! # Conflation
//! In a `--conflate` room a socket that falls behind is served the latest value of each key
//! instead of every value ([`Gate::write_through`] with the frames' keys). Once what it has queued,
//! counting the bytes the kernel holds unsent (`SIOCOUTQ`: on a weak link the kernel's send buffer,
//! autotuned up to megabytes, fills with stale values first), passes `--conflate-above`, the gate
//! conflates: its kernel buffer is cut to [`CONFLATED_SNDBUF`] so what waits stays in the gate's
//! queue, and a keyed frame replaces the queued frame of the same room and key, in its place,
//! marked with how many values the socket skipped (`"skipped":N`). Unkeyed frames queue as ever,
//! and the budget still holds for what cannot be conflated. The gate leaves conflation when its
//! queue drains; the kernel buffer stays small for the socket's life. What conflation keeps is one
//! slot per key queued: bounded by the keys of its rooms.
//!
//! # Context
//! A socket that keeps the node's compression context ([`super::context`]) has a [`Window`]: what
//! its inflater read last. The gate keeps it under the same lock as its queue, so it follows the
//! order the frames go out in: every compressed frame queued or written counts, a room's linked
//! frame goes only where the window has what it refers to ([`Gate::write_linked`]), and a conflated
//! value never puts a compressed payload between frames already counted.
//!
//! A std `Mutex` guards the queue and every write, so frames reach the socket in queue order
//! whoever writes them. It is per socket and held for a push or one non-blocking write, never across
//! an `.await`.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    sync::{Mutex, OnceLock},
    task::{Context, Poll},
};

#[cfg(target_os = "linux")]
use std::os::fd::BorrowedFd;

use std::{collections::HashMap, sync::Arc};

use bytes::{Buf, Bytes};
use tokio::{net::tcp::OwnedWriteHalf, sync::Notify};

use super::{
    context::{Linked, Window},
    keyed::Tag,
};
use crate::{metrics as m, wire};

/// The kernel send buffer of a socket once conflated: small, so what waits is in the gate's queue,
/// where a newer value can replace it (Linux doubles it for its own bookkeeping).
pub const CONFLATED_SNDBUF: usize = 4 * 1024;

/// Frames handed to one `writev` at most.
const MAX_SLICES: usize = 64;

/// Where a gate's frames go when it is not a socket's own write half ([`Gate::attach_socket`]):
/// stand-ins in benches and tests. A stand-in is always written through its methods.
pub trait Outlet: Send + Sync + 'static {
    /// Writes what the kernel takes now, without waiting; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Ready when a write may make progress again.
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Outlet for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        OwnedWriteHalf::try_write_vectored(self, bufs)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }
}

/// A socket's write half with its descriptor read once: a paced turn writes the descriptor without
/// touching the half or the runtime's readiness (each a cache miss per socket per write). The
/// descriptor is private and only lent out borrowed from the half that keeps it open, so it cannot
/// outlive the socket.
struct Socket {
    half: OwnedWriteHalf,
    #[cfg(target_os = "linux")]
    fd: std::os::fd::RawFd,
}

impl Socket {
    fn new(half: OwnedWriteHalf) -> Socket {
        Socket {
            #[cfg(target_os = "linux")]
            fd: std::os::fd::AsRawFd::as_raw_fd(half.as_ref()),
            half,
        }
    }

    #[cfg(target_os = "linux")]
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` is `half`'s descriptor, open for as long as `half` lives, and the borrow
        // cannot outlive `self`, which owns `half`.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// A gate's socket once connected.
enum Attached {
    Socket(Socket),
    Outlet(Box<dyn Outlet>),
}

impl Attached {
    fn outlet(&self) -> &dyn Outlet {
        match self {
            Attached::Socket(s) => &s.half,
            Attached::Outlet(o) => o.as_ref(),
        }
    }

    /// Writes without waiting: a socket by its descriptor, a stand-in through its outlet.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            Attached::Socket(s) => send_fd(s.fd(), bufs),
            _ => self.outlet().try_write_vectored(bufs),
        }
    }
}

impl Attached {
    /// Bytes the kernel holds unsent or unacknowledged (`SIOCOUTQ`); 0 for a stand-in.
    fn unsent(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            Attached::Socket(s) => {
                use std::os::fd::AsRawFd;
                let mut n: libc::c_int = 0;
                // SAFETY: the descriptor is open for the borrow's life and `n` outlives the call,
                // which only writes one int.
                let r = unsafe { libc::ioctl(s.fd().as_raw_fd(), libc::TIOCOUTQ, &mut n) };
                if r == 0 {
                    n.max(0) as usize
                } else {
                    0
                }
            }
            _ => 0,
        }
    }

    /// Caps the kernel's send buffer (`SO_SNDBUF`), which also stops its autotuning.
    fn shrink_send_buffer(&self, bytes: usize) {
        #[cfg(target_os = "linux")]
        if let Attached::Socket(s) = self {
            use std::os::fd::AsRawFd;
            let size = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
            // SAFETY: the descriptor is open for the borrow's life; the option is one int, read
            // from `size`, which outlives the call.
            let r = unsafe {
                libc::setsockopt(
                    s.fd().as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "could not cut a conflated socket's send buffer");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = bytes;
    }
}

/// One `sendmsg` on a socket, not waiting and not raising SIGPIPE.
#[cfg(target_os = "linux")]
fn send_fd(fd: BorrowedFd<'_>, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `iovec` on Unix; sendmsg only reads them.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `fd` is open for the borrow's life, and `msg` and the buffers it points to outlive
    // the call.
    let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued (and written, where the caller writes): counted against the budget until the kernel
    /// takes it.
    Queued,
    /// This push passed the budget: the queue was freed and the socket is being dropped.
    Overflow,
    /// The gate was already overflowed, closing or broken; the frame was discarded.
    Closed,
}

/// What the session's writer must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The kernel did not take everything: [`Gate::drain`] the rest.
    Congested,
    /// Close with 4008 and end.
    Overflow,
    /// Write what is queued, then close with this frame (or just end) and stop.
    Close(Option<(u16, &'static str)>),
    /// A write failed: the connection is gone.
    Broken,
}

#[derive(Debug, Clone, Copy)]
enum Status {
    Open,
    Overflowed,
    Closing(Option<(u16, &'static str)>),
    Broken,
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames`: queued and not yet taken by the kernel.
    queued: usize,
    /// The front frame is partly written; it must be finished before anything else goes out.
    partial: bool,
    /// A write left frames behind; the writer drains them when the socket is writable.
    congested: bool,
    /// Queued bytes the budget does not count ([`Gate::send_outside_budget`]); the first bytes
    /// written are taken to be these.
    exempt: usize,
    status: Status,
    /// While conflating: where each key's queued value is.
    conflation: Option<Box<Conflation>>,
    /// For a socket that keeps the node's compression context: what its inflater read last.
    window: Option<Box<Window>>,
}

/// A room and a key.
type Slot = (Arc<str>, Box<str>);

/// A conflating gate's keyed frames still queued: per room and key, the frame's place (counted from
/// the conflation's start, so pops need not renumber) and the values it stands for but one.
#[derive(Debug, Default)]
struct Conflation {
    /// Frames written whole since the conflation began.
    popped: u64,
    slots: HashMap<Slot, (u64, u32), ahash::RandomState>,
}

impl State {
    /// Writes queued frames until the queue is empty (`Ok(true)`) or the kernel takes no more
    /// (`Ok(false)`). A failed write means the connection is gone: the gate breaks and its queue
    /// is freed, whoever was writing.
    fn write(&mut self, outlet: &dyn Outlet) -> io::Result<bool> {
        let failed = loop {
            if self.frames.is_empty() {
                return Ok(true);
            }
            match writev(|b| outlet.try_write_vectored(b), self.frames.iter()) {
                Ok(Some(written)) => self.consume(written),
                Ok(None) => return Ok(false),
                Err(e) => break e,
            }
        };
        self.broke();
        Err(failed)
    }

    /// The connection is gone: nothing more goes out.
    fn broke(&mut self) {
        self.status = Status::Broken;
        self.free();
    }

    /// Queues a frame within `budget`. Past it the queue is freed and the gate overflows: false.
    fn queue(&mut self, frame: Bytes, budget: usize) -> bool {
        if self.queued - self.exempt + frame.len() > budget {
            self.status = Status::Overflowed;
            self.free();
            return false;
        }
        self.queued += frame.len();
        self.frames.push_back(frame);
        true
    }

    /// Writes the queue now unless the writer has it already (congested) or it is empty. True
    /// when the writer must be woken: the kernel left bytes, or the connection is gone.
    fn flush(&mut self, outlet: &dyn Outlet) -> bool {
        if self.congested || self.frames.is_empty() {
            return false;
        }
        match self.write(outlet) {
            Ok(true) => false,
            Ok(false) => {
                self.congested = true;
                true
            }
            Err(_) => true,
        }
    }

    fn consume(&mut self, mut written: usize) {
        self.queued = self.queued.saturating_sub(written);
        self.exempt = self.exempt.saturating_sub(written);
        while let Some(front) = self.frames.front_mut() {
            if written < front.len() {
                front.advance(written);
                self.partial = written > 0 || self.partial;
                return;
            }
            written -= front.len();
            self.frames.pop_front();
            self.partial = false;
            if let Some(c) = self.conflation.as_mut() {
                c.popped += 1;
            }
        }
        if self.frames.is_empty() && self.conflation.take().is_some() {
            m::conflating(-1);
        }
    }

    /// Queues a frame while conflating: a keyed frame of a conflated room replaces its key's
    /// queued value (unless that one is partly written) in place; anything else queues as
    /// [`State::queue`] does.
    fn conflate(&mut self, frame: &Bytes, tag: &Tag, budget: usize) -> bool {
        let (Some(keyed), Some(c)) = (tag.as_ref().filter(|k| k.conflate), self.conflation.as_mut()) else {
            return self.queue(frame.clone(), budget);
        };
        let slot = (keyed.room.clone(), keyed.key.clone());
        if keyed.delta_of.is_some() {
            // A delta needs the value before it: it queues, and a newer value of the key replaces
            // it, never the value it is based on.
            let at = c.popped + self.frames.len() as u64;
            c.slots.insert(slot, (at, 0));
            return self.queue(frame.clone(), budget);
        }
        let place = c.slots.get(&slot).and_then(|&(at, skipped)| {
            let i = at.checked_sub(c.popped)? as usize;
            (i < self.frames.len() && !(i == 0 && self.partial)).then_some((i, skipped))
        });
        // A compressed value in place of an uncompressed one would come between compressed frames
        // the window counted as read in a row: it queues instead.
        let place = place.filter(|&(i, _)| {
            self.window.is_none() || !wire::is_compressed(frame) || wire::is_compressed(&self.frames[i])
        });
        let Some((i, skipped)) = place else {
            let at = c.popped + self.frames.len() as u64;
            c.slots.insert(slot, (at, 0));
            return self.queue(frame.clone(), budget);
        };
        let skipped = skipped + 1;
        let Some(marked) = wire::with_skipped(frame, skipped) else {
            return self.queue(frame.clone(), budget);
        };
        m::skipped("conflated", 1);
        c.slots.insert(slot, (c.popped + i as u64, skipped));
        self.queued = self.queued - self.frames[i].len() + marked.len();
        self.frames[i] = marked;
        if self.queued - self.exempt > budget {
            self.status = Status::Overflowed;
            self.free();
            return false;
        }
        true
    }

    /// Frames go out in this order: a compressed one ends the window's run of a room's messages.
    fn count(&mut self, frames: &[Bytes]) {
        if let Some(w) = self.window.as_mut() {
            if frames.iter().any(|f| wire::is_compressed(f)) {
                w.broken();
            }
        }
    }

    /// Frees the queue, but for a partly written frame, which the socket needs whole.
    fn free(&mut self) {
        if self.conflation.take().is_some() {
            m::conflating(-1);
        }
        let head = if self.partial { self.frames.pop_front() } else { None };
        self.frames = VecDeque::new();
        self.queued = 0;
        self.exempt = 0;
        if let Some(head) = head {
            self.queued = head.len();
            self.frames.push_back(head);
        }
    }
}

/// One non-blocking `writev` (with `write`) of up to [`MAX_SLICES`] frames (at least one): the
/// bytes the kernel took, or `None` when it takes nothing now.
fn writev<'a>(
    write: impl Fn(&[IoSlice<'_>]) -> io::Result<usize>,
    frames: impl Iterator<Item = &'a Bytes>,
) -> io::Result<Option<usize>> {
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let mut n = 0;
    for (slice, frame) in slices.iter_mut().zip(frames) {
        *slice = IoSlice::new(frame);
        n += 1;
    }
    loop {
        match write(&slices[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => return Ok(Some(written)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `frames` (none queued before them) without waiting, as far as the kernel takes them:
/// how many went whole, and how many bytes of the next one.
fn write_direct(to: &Attached, frames: &[Bytes]) -> io::Result<(usize, usize)> {
    let write = |bufs: &[IoSlice<'_>]| to.try_write_vectored(bufs);
    let mut whole = 0;
    while whole < frames.len() {
        let batch = (frames.len() - whole).min(MAX_SLICES);
        let Some(mut written) = writev(write, frames[whole..].iter())? else {
            break;
        };
        let end = whole + batch;
        while whole < end && written >= frames[whole].len() {
            written -= frames[whole].len();
            whole += 1;
        }
        if whole < end {
            return Ok((whole, written));
        }
    }
    Ok((whole, 0))
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("state", &self.state)
            .field("budget", &self.budget)
            .field("attached", &self.outlet.get().is_some())
            .finish()
    }
}

pub struct Gate {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when queued bytes went out or the gate stopped: for a sender waiting for room
    /// ([`Gate::room_below`]).
    room: Notify,
    budget: usize,
    /// Queued bytes (the kernel's unsent ones too) past which keyed frames of a conflated room are
    /// conflated; `usize::MAX`: never.
    conflate_above: usize,
    outlet: OnceLock<Attached>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        if self.lock().conflation.is_some() {
            m::conflating(-1);
        }
    }
}

impl Gate {
    /// A gate that conflates past `above` queued bytes (see the module's doc).
    pub fn conflating(budget: usize, above: usize) -> Gate {
        Gate {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                queued: 0,
                partial: false,
                congested: false,
                exempt: 0,
                status: Status::Open,
                conflation: None,
                window: None,
            }),
            notify: Notify::new(),
            room: Notify::new(),
            budget,
            conflate_above: above,
            outlet: OnceLock::new(),
        }
    }

    pub fn new(budget: usize) -> Gate {
        Gate::conflating(budget, usize::MAX)
    }

    /// The socket keeps the node's compression context: its window is followed from now on, and
    /// [`Gate::write_linked`] may send it linked frames. Before its first frame.
    pub fn keep_context(&self) {
        self.lock().window = Some(Box::default());
    }

    /// Tells the writer something changed, and whoever waits for room.
    fn wake(&self) {
        self.notify.notify_one();
        self.room.notify_waiters();
    }

    /// Waits until at most `bytes` are queued: true, or false once the gate stopped (closing,
    /// overflowed, broken). Woken by the writes that empty the queue, never by polling.
    pub async fn room_below(&self, bytes: usize) -> bool {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let st = self.lock();
                if !matches!(st.status, Status::Open) {
                    return false;
                }
                if st.queued <= bytes {
                    return true;
                }
            }
            room.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every change is one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects the socket's write half (once the upgrade completed) and flushes what waited for
    /// it. The gate owns the half from then on: the socket is not shut down before the gate is
    /// dropped.
    pub fn attach_socket(&self, half: OwnedWriteHalf) {
        self.connect(Attached::Socket(Socket::new(half)));
    }

    /// Connects a stand-in for a socket (benches, tests).
    pub fn attach(&self, outlet: Box<dyn Outlet>) {
        self.connect(Attached::Outlet(outlet));
    }

    fn connect(&self, to: Attached) {
        if self.outlet.set(to).is_ok() {
            self.flush();
        }
    }

    /// Queues a frame without waiting.
    pub fn push(&self, frame: Bytes) -> Push {
        let mut st = self.lock();
        if !matches!(st.status, Status::Open) {
            return Push::Closed;
        }
        st.count(std::slice::from_ref(&frame));
        if !st.queue(frame, self.budget) {
            drop(st);
            self.wake();
            return Push::Overflow;
        }
        Push::Queued
    }

    /// Hands a socket its turn's frames and writes them at once: the paced writer's path, one lock
    /// and one `writev` straight from the shared frames when nothing else waits, so frames the
    /// kernel takes are never queued. What it does not take is queued and counted as
    /// [`Gate::push`] would (the writer finishes it when the socket is writable); past the budget
    /// the gate overflows. Behind other queued frames, or before the socket is attached, the
    /// frames join the queue and the queue is written. A frame larger than the whole budget
    /// overflows the gate before anything is written, as a push of it would.
    ///
    /// `tags` are the frames' keys (one per frame, or none at all): with them a gate that conflates
    /// may conflate.
    pub fn write_through(&self, frames: &[Bytes], tags: &[Tag]) -> Push {
        let mut st = self.lock();
        if !matches!(st.status, Status::Open) {
            return Push::Closed;
        }
        st.count(frames);
        self.write_locked(st, frames, tags)
    }

    /// [`Gate::write_through`] for frames some of which are a room's messages with a linked form
    /// (`links`, one per frame): each goes linked where the socket's window has what it refers to,
    /// decided here, in the order the frames go out. Returns how many went linked. A socket that
    /// does not keep the context gets `frames` as they are.
    pub fn write_linked(&self, frames: &mut [Bytes], tags: &[Tag], links: &[Linked]) -> (Push, usize) {
        let mut st = self.lock();
        if !matches!(st.status, Status::Open) {
            return (Push::Closed, 0);
        }
        let mut linked = 0;
        if let Some(w) = st.window.as_mut() {
            for (frame, link) in frames.iter_mut().zip(links) {
                match link {
                    Some(link) => {
                        // Taken whatever it goes as: the message joins the window either way.
                        if let Some(to) = w.take(link) {
                            *frame = to.clone();
                            linked += 1;
                        }
                    }
                    None if wire::is_compressed(frame) => w.broken(),
                    None => {}
                }
            }
        }
        (self.write_locked(st, frames, tags), linked)
    }

    /// [`Gate::write_through`]'s writing, the window counted and the gate open.
    fn write_locked(&self, mut st: std::sync::MutexGuard<'_, State>, frames: &[Bytes], tags: &[Tag]) -> Push {
        const DONE: Push = Push::Queued;
        if self.conflate_above != usize::MAX && tags.iter().flatten().any(|k| k.conflate) {
            return self.write_conflated(st, frames, tags);
        }
        if frames.iter().any(|frame| frame.len() > self.budget) {
            st.status = Status::Overflowed;
            st.free();
            drop(st);
            self.wake();
            return Push::Overflow;
        }
        let outlet = self.outlet.get();
        let Some(to) = outlet.filter(|_| st.frames.is_empty() && !st.congested) else {
            // Behind the queue, or not attached yet: as pushes and a flush would.
            for frame in frames {
                if !st.queue(frame.clone(), self.budget) {
                    drop(st);
                    self.wake();
                    return Push::Overflow;
                }
            }
            return self.flush_queued(st);
        };
        let (whole, written) = match write_direct(to, frames) {
            Ok(done) => done,
            Err(_) => {
                st.broke();
                drop(st);
                self.wake();
                return Push::Closed;
            }
        };
        if whole == frames.len() {
            return DONE;
        }
        // The kernel is full: the writer finishes the job when the socket is writable again.
        let mut rest = &frames[whole..];
        if written > 0 {
            // Partly on the wire: it must go out whole, whatever the budget.
            let mut head = rest[0].clone();
            head.advance(written);
            st.queued += head.len();
            st.frames.push_back(head);
            st.partial = true;
            rest = &rest[1..];
        }
        st.congested = true;
        let overflowed = rest.iter().any(|frame| !st.queue(frame.clone(), self.budget));
        drop(st);
        self.wake();
        if overflowed {
            Push::Overflow
        } else {
            DONE
        }
    }

    /// [`Gate::write_through`] for frames some of which may be conflated: conflating from when the
    /// queue and the kernel's unsent bytes pass the mark.
    fn write_conflated(&self, mut st: std::sync::MutexGuard<'_, State>, frames: &[Bytes], tags: &[Tag]) -> Push {
        let outlet = self.outlet.get();
        if st.conflation.is_none() {
            let incoming: usize = frames.iter().map(Bytes::len).sum();
            let unsent = outlet.map_or(0, Attached::unsent);
            if st.queued + unsent + incoming > self.conflate_above {
                st.conflation = Some(Box::default());
                m::conflating(1);
                if let Some(to) = outlet {
                    to.shrink_send_buffer(CONFLATED_SNDBUF);
                }
            }
        }
        for (i, frame) in frames.iter().enumerate() {
            let tag = tags.get(i).unwrap_or(&None);
            let queued = if st.conflation.is_some() {
                st.conflate(frame, tag, self.budget)
            } else {
                frame.len() <= self.budget && st.queue(frame.clone(), self.budget)
            };
            if !queued {
                if matches!(st.status, Status::Open) {
                    st.status = Status::Overflowed;
                    st.free();
                }
                drop(st);
                self.wake();
                return Push::Overflow;
            }
        }
        self.flush_queued(st)
    }

    /// Writes what was just queued, if the socket is attached: `Queued`, or `Closed` when the
    /// write found the connection gone.
    fn flush_queued(&self, mut st: std::sync::MutexGuard<'_, State>) -> Push {
        let wake = self.outlet.get().is_some_and(|to| st.flush(to.outlet()));
        let broken = matches!(st.status, Status::Broken);
        drop(st);
        if wake {
            self.wake();
        }
        if broken {
            Push::Closed
        } else {
            Push::Queued
        }
    }

    /// Queues one frame outside the budget and writes the queue now: for an answer the client
    /// asked for that may be larger than the budget. Frames queued after it are held to the
    /// budget as if it were not there.
    pub fn send_outside_budget(&self, frame: Bytes) -> Push {
        {
            let mut st = self.lock();
            if !matches!(st.status, Status::Open) {
                return Push::Closed;
            }
            st.count(std::slice::from_ref(&frame));
            st.exempt += frame.len();
            st.queued += frame.len();
            st.frames.push_back(frame);
        }
        self.flush();
        Push::Queued
    }

    /// Whether the socket is being closed (or gone): nothing more will be written.
    pub fn is_closing(&self) -> bool {
        !matches!(self.lock().status, Status::Open)
    }

    /// The bytes this gate may hold queued.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Gives up on a consumer that fell behind elsewhere (what was held for it passed the
    /// budget): frees the queue and has the writer close with 4008.
    pub fn overflow(&self) {
        let mut st = self.lock();
        if matches!(st.status, Status::Open) {
            st.status = Status::Overflowed;
            st.free();
        }
        drop(st);
        self.wake();
    }

    /// Queues a frame and writes the queue now: for a session's own replies and pings.
    pub fn send(&self, frame: Bytes) -> Push {
        let pushed = self.push(frame);
        if matches!(pushed, Push::Queued) {
            self.flush();
        }
        pushed
    }

    /// Writes what is queued, without waiting. Leaves the rest to the writer when the kernel's
    /// buffer is full (or to [`Gate::attach`] before the socket is connected).
    pub fn flush(&self) {
        let Some(outlet) = self.outlet.get() else {
            return;
        };
        let mut st = self.lock();
        // Congested or broken: the writer goes on from there (or ends the session).
        let wake = st.flush(outlet.outlet());
        drop(st);
        if wake {
            self.wake();
        } else {
            self.room.notify_waiters();
        }
    }

    /// Asks the writer to send what is queued, then `frame` (if any), then stop. The first close wins.
    pub fn close(&self, frame: Option<(u16, &'static str)>) {
        let mut st = self.lock();
        if matches!(st.status, Status::Open) {
            st.status = Status::Closing(frame);
        }
        drop(st);
        self.wake();
    }

    /// Waits until the writer has something to do.
    pub async fn next(&self) -> Next {
        loop {
            // Registered before the check, so a change between the check and the wait is not missed.
            let notified = self.notify.notified();
            {
                let st = self.lock();
                match st.status {
                    Status::Overflowed => return Next::Overflow,
                    Status::Broken => return Next::Broken,
                    Status::Closing(frame) => return Next::Close(frame),
                    Status::Open if st.congested => return Next::Congested,
                    Status::Open => {}
                }
            }
            notified.await;
        }
    }

    /// Writes everything queued, waiting for the socket as long as it takes (callers bound it).
    pub async fn drain(&self) -> io::Result<()> {
        let Some(outlet) = self.outlet.get() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        loop {
            std::future::poll_fn(|cx| outlet.outlet().poll_write_ready(cx)).await?;
            let mut st = self.lock();
            let wrote = st.write(outlet.outlet());
            if matches!(wrote, Ok(true)) {
                st.congested = false;
            }
            drop(st);
            self.room.notify_waiters();
            match wrote {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues the session's last frame behind whatever is queued (past the budget and the status:
    /// a close frame always goes out after the frames before it), for [`Gate::drain`].
    pub fn finish(&self, frame: Bytes) {
        let mut st = self.lock();
        if !matches!(st.status, Status::Broken) {
            st.queued += frame.len();
            st.frames.push_back(frame);
        }
    }

    /// Waits until the gate is no longer open (overflowed, closing or broken): lets a writer stuck
    /// on a full socket stop waiting and close instead.
    pub async fn interrupted(&self) {
        loop {
            let notified = self.notify.notified();
            if !matches!(self.lock().status, Status::Open) {
                return;
            }
            notified.await;
        }
    }

    /// Bytes counted against the budget now.
    /// Whether the socket conflates a write of `incoming` bytes: it is behind past its mark, or
    /// those bytes take it there (as [`Gate::write_through`] judges). Its queued values are then
    /// replaceable, and a delta, which needs the value before it, must not be among them.
    pub fn conflates(&self, incoming: usize) -> bool {
        if self.conflate_above == usize::MAX {
            return false;
        }
        let st = self.lock();
        let unsent = self.outlet.get().map_or(0, Attached::unsent);
        st.conflation.is_some() || st.queued + unsent + incoming > self.conflate_above
    }

    pub fn queued(&self) -> usize {
        self.lock().queued
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        task::Waker,
        time::Duration,
    };

    use super::*;

    /// A socket stand-in whose kernel buffer takes `room` more bytes.
    #[derive(Default)]
    struct Pipe {
        room: usize,
        out: Vec<u8>,
        writes: usize,
        fail: bool,
        waker: Option<Waker>,
    }

    #[derive(Clone, Default)]
    struct TestOutlet(Arc<Mutex<Pipe>>);

    impl TestOutlet {
        fn with_room(room: usize) -> TestOutlet {
            let o = TestOutlet::default();
            o.0.lock().unwrap().room = room;
            o
        }

        fn open(&self, room: usize) {
            let mut p = self.0.lock().unwrap();
            p.room += room;
            if let Some(w) = p.waker.take() {
                w.wake();
            }
        }

        fn out(&self) -> Vec<u8> {
            self.0.lock().unwrap().out.clone()
        }
    }

    impl Outlet for TestOutlet {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut p = self.0.lock().unwrap();
            if p.fail {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            if p.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            p.writes += 1;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(p.room - n);
                p.out.extend_from_slice(&b[..take]);
                n += take;
            }
            p.room -= n;
            Ok(n)
        }

        fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut p = self.0.lock().unwrap();
            if p.room > 0 {
                Poll::Ready(Ok(()))
            } else {
                p.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn frame(byte: u8, n: usize) -> Bytes {
        Bytes::from(vec![byte; n])
    }

    #[tokio::test]
    async fn counts_bytes_until_the_kernel_takes_them() {
        let gate = Gate::new(100);
        assert_eq!(gate.push(frame(1, 40)), Push::Queued);
        assert_eq!(gate.push(frame(2, 40)), Push::Queued);
        // No socket yet: everything stays queued and counted.
        gate.flush();
        assert_eq!(gate.queued(), 80);
        assert_eq!(gate.push(frame(3, 30)), Push::Overflow);
        assert!(matches!(gate.lock().status, Status::Overflowed));
        assert_eq!(gate.queued(), 0, "the queue is freed");
        assert_eq!(gate.push(frame(4, 1)), Push::Closed);
        assert_eq!(gate.next().await, Next::Overflow);
    }

    #[tokio::test]
    async fn one_write_carries_the_whole_queue_in_order() {
        let gate = Gate::new(1000);
        for b in 1..=3 {
            gate.push(frame(b, 10));
        }
        let outlet = TestOutlet::with_room(1 << 20);
        gate.attach(Box::new(outlet.clone()));
        assert_eq!(outlet.0.lock().unwrap().writes, 1);
        let expect: Vec<u8> = [frame(1, 10), frame(2, 10), frame(3, 10)].concat();
        assert_eq!(outlet.out(), expect);
        assert_eq!(gate.queued(), 0);
        // The queue is empty again: the next push asks for a flush.
        assert_eq!(gate.send(frame(4, 5)), Push::Queued);
        assert_eq!(outlet.out().len(), 35);
    }

    #[tokio::test]
    async fn a_full_socket_congests_then_overflow_keeps_the_partly_written_frame() {
        let gate = Gate::new(200);
        let outlet = TestOutlet::with_room(50);
        gate.attach(Box::new(outlet.clone()));
        for b in 1..=3 {
            gate.push(frame(b, 40));
        }
        gate.flush();
        // 50 bytes went: frame 1 and a quarter of frame 2.
        assert_eq!(gate.queued(), 70);
        assert_eq!(gate.next().await, Next::Congested);
        // Congested: pushes leave the writing to the writer.
        assert_eq!(gate.push(frame(4, 40)), Push::Queued);
        assert_eq!(gate.push(frame(5, 100)), Push::Overflow);
        assert_eq!(gate.queued(), 30, "only the rest of the partly written frame is kept");
        assert_eq!(gate.next().await, Next::Overflow);
        gate.finish(frame(9, 4));
        let drain = tokio::spawn({
            let outlet = outlet.clone();
            async move {
                tokio::task::yield_now().await;
                outlet.open(1000);
            }
        });
        tokio::time::timeout(Duration::from_secs(5), gate.drain())
            .await
            .unwrap()
            .unwrap();
        drain.await.unwrap();
        let expect: Vec<u8> = [frame(1, 40), frame(2, 40), frame(9, 4)].concat();
        assert_eq!(outlet.out(), expect, "whole frames, then the last one");
    }

    #[tokio::test]
    async fn a_turn_is_written_straight_through_and_the_rest_queued_in_order() {
        let gate = Gate::new(200);
        let outlet = TestOutlet::with_room(50);
        gate.attach(Box::new(outlet.clone()));
        let turn = [frame(1, 40), frame(2, 40), frame(3, 40)];
        assert_eq!(gate.write_through(&turn, &[]), Push::Queued);
        assert_eq!(outlet.0.lock().unwrap().writes, 1);
        // 50 bytes went: frame 1 and a quarter of frame 2; the rest is counted.
        assert_eq!(gate.queued(), 70);
        assert_eq!(gate.next().await, Next::Congested);
        // Behind the queue: the next turn joins it instead of writing.
        assert_eq!(gate.write_through(&[frame(4, 20)], &[]), Push::Queued);
        assert_eq!(outlet.0.lock().unwrap().writes, 1);
        outlet.open(1000);
        gate.drain().await.unwrap();
        let expect: Vec<u8> = [frame(1, 40), frame(2, 40), frame(3, 40), frame(4, 20)].concat();
        assert_eq!(outlet.out(), expect);
        assert_eq!(gate.queued(), 0);
        // Nothing waits any more: a whole turn goes in one write.
        gate.write_through(&[frame(5, 10), frame(6, 10)], &[]);
        assert_eq!(outlet.0.lock().unwrap().writes, 3);
        assert_eq!(gate.queued(), 0);
    }

    /// A `msg` frame of key `key` in a conflated room, and its tag.
    fn keyed(key: &str, i: u32) -> (Bytes, Tag) {
        let mut env = crate::envelope::Envelope::to_room("m", Bytes::from(format!("{i}")));
        env.key = Some(key.into());
        let frame = wire::broadcast_frame(crate::encoding::Encoding::Json, &env, 0).unwrap();
        let tag = Arc::new(super::super::keyed::Keyed {
            room: "m".into(),
            key: key.into(),
            seq: u64::from(i),
            conflate: true,
            delta_of: None,
        });
        (frame, Some(tag))
    }

    #[tokio::test]
    async fn past_the_mark_a_keys_queued_value_is_replaced_in_place_and_unkeyed_frames_queue() {
        let gate = Gate::conflating(100_000, 200);
        let outlet = TestOutlet::with_room(0);
        gate.attach(Box::new(outlet.clone()));
        let (mut frames, mut tags) = (Vec::new(), Vec::new());
        for i in 0..30 {
            let (f, t) = keyed(if i % 2 == 0 { "score" } else { "clock" }, i);
            frames.push(f);
            tags.push(t);
            if i == 10 {
                let chat = crate::envelope::Envelope::to_room("m", Bytes::from_static(b"\"chat\""));
                frames.push(wire::broadcast_frame(crate::encoding::Encoding::Json, &chat, 0).unwrap());
                tags.push(None);
            }
        }
        assert_eq!(gate.write_through(&frames, &tags), Push::Queued);
        // Below the mark the first frames queued whole; then one slot per key, the chat line kept.
        outlet.open(100_000);
        gate.drain().await.unwrap();
        let got: Vec<serde_json::Value> = wire::tests::read_all(&outlet.out())
            .into_iter()
            .filter_map(|m| serde_json::from_str(m.to_text().ok()?).ok())
            .collect();
        assert_eq!(
            got.iter().filter(|v| v["data"] == "chat").count(),
            1,
            "the unkeyed frame queued"
        );
        let keyed: Vec<&serde_json::Value> = got.iter().filter(|v| v["key"].is_string()).collect();
        assert!(keyed.len() < 30, "conflated: {} frames", keyed.len());
        let skipped: u64 = keyed.iter().filter_map(|v| v["skipped"].as_u64()).sum();
        assert_eq!(keyed.len() as u64 + skipped, 30);
        for key in ["score", "clock"] {
            let last = keyed.iter().rfind(|v| v["key"] == key).unwrap();
            assert_eq!(last["data"], if key == "score" { 28 } else { 29 });
        }
        // Drained: it left conflation, and frames go straight through again.
        assert!(gate.lock().conflation.is_none());
    }

    #[tokio::test]
    async fn a_turn_the_kernel_leaves_past_the_budget_overflows_keeping_the_partly_written_frame() {
        let gate = Gate::new(100);
        let outlet = TestOutlet::with_room(10);
        gate.attach(Box::new(outlet.clone()));
        let turn = [frame(1, 60), frame(2, 60), frame(3, 60)];
        assert_eq!(gate.write_through(&turn, &[]), Push::Overflow);
        assert_eq!(gate.next().await, Next::Overflow);
        assert_eq!(gate.queued(), 50, "the rest of frame 1 only");
        assert_eq!(gate.write_through(&turn, &[]), Push::Closed);
        // A frame larger than the whole budget overflows before anything is written.
        let gate = Gate::new(100);
        let outlet = TestOutlet::with_room(1000);
        gate.attach(Box::new(outlet.clone()));
        assert_eq!(gate.write_through(&[frame(1, 10), frame(2, 150)], &[]), Push::Overflow);
        assert!(outlet.out().is_empty());
        assert_eq!(gate.next().await, Next::Overflow);
        // A frame the kernel took part of is kept whole, and what does not fit behind it overflows.
        let gate = Gate::new(100);
        let outlet = TestOutlet::with_room(10);
        gate.attach(Box::new(outlet.clone()));
        assert_eq!(gate.write_through(&[frame(1, 90), frame(2, 60)], &[]), Push::Overflow);
        assert_eq!(gate.queued(), 80);
        outlet.open(1000);
        gate.drain().await.unwrap();
        assert_eq!(
            outlet.out(),
            frame(1, 90),
            "the partly written frame, whole, and nothing after"
        );
        // Not attached yet: a turn is queued, and written on attach.
        let gate = Gate::new(100);
        gate.write_through(&[frame(7, 5), frame(8, 5)], &[]);
        assert_eq!(gate.queued(), 10);
        let outlet = TestOutlet::with_room(100);
        gate.attach(Box::new(outlet.clone()));
        assert_eq!(outlet.out(), [frame(7, 5), frame(8, 5)].concat());
        // A failed write breaks the gate.
        outlet.0.lock().unwrap().fail = true;
        assert_eq!(gate.write_through(&[frame(9, 5)], &[]), Push::Closed);
        assert_eq!(gate.next().await, Next::Broken);
    }

    #[tokio::test]
    async fn close_lets_queued_frames_go_first_and_the_first_close_wins() {
        let gate = Gate::new(1000);
        gate.push(frame(1, 10));
        gate.close(Some((4001, "drain")));
        gate.close(Some((1000, "late")));
        assert_eq!(gate.push(frame(2, 10)), Push::Closed);
        assert_eq!(gate.next().await, Next::Close(Some((4001, "drain"))));
        let outlet = TestOutlet::with_room(1000);
        gate.attach(Box::new(outlet.clone()));
        gate.finish(frame(3, 2));
        gate.drain().await.unwrap();
        assert_eq!(outlet.out(), [frame(1, 10), frame(3, 2)].concat());
    }

    #[tokio::test]
    async fn a_failed_write_breaks_the_gate() {
        let gate = Gate::new(1000);
        let outlet = TestOutlet::with_room(1000);
        outlet.0.lock().unwrap().fail = true;
        gate.attach(Box::new(outlet));
        gate.send(frame(1, 10));
        assert_eq!(gate.next().await, Next::Broken);
        assert_eq!(gate.queued(), 0);
        assert_eq!(gate.push(frame(2, 10)), Push::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_writer_is_interrupted_by_overflow_and_by_close() {
        for close in [false, true] {
            let gate = Arc::new(Gate::new(10));
            let g = gate.clone();
            let waiter = tokio::spawn(async move { g.interrupted().await });
            tokio::task::yield_now().await;
            gate.push(frame(1, 5));
            tokio::task::yield_now().await;
            assert!(!waiter.is_finished(), "a push within the budget does not interrupt");
            if close {
                gate.close(Some((4002, "idle timeout")));
            } else {
                gate.push(frame(2, 11));
            }
            tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// A connected pair of loopback TCP sockets: the server side's write half and the client side.
    async fn socket_pair() -> (OwnedWriteHalf, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (_read, write) = accepted.unwrap().0.into_split();
        (write, client.unwrap())
    }

    #[tokio::test]
    async fn a_turn_goes_through_the_sockets_own_descriptor_and_what_the_kernel_leaves_is_drained() {
        use tokio::io::AsyncReadExt;
        let (half, mut client) = socket_pair().await;
        let gate = Arc::new(Gate::new(64 << 20));
        gate.attach_socket(half);
        // Small enough for the kernel to take at once: written straight through, nothing queued.
        let small = [frame(1, 10), frame(2, 20), frame(3, 30)];
        assert_eq!(gate.write_through(&small, &[]), Push::Queued);
        assert_eq!(gate.queued(), 0, "the kernel took the whole turn");
        let mut got = vec![0; 60];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, small.concat());
        // More than loopback buffers hold: the rest is queued whole and drained by the writer.
        let big: Vec<Bytes> = (0..64).map(|i| frame(i, 256 << 10)).collect();
        assert_eq!(gate.write_through(&big, &[]), Push::Queued);
        assert!(gate.queued() > 0, "the kernel left part of 16 MiB");
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 64 * (256 << 10)];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        assert_eq!(gate.next().await, Next::Congested);
        tokio::time::timeout(Duration::from_secs(20), gate.drain())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gate.queued(), 0);
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .unwrap()
            .unwrap();
        assert!(got == big.concat(), "every byte once, in order");
    }

    /// What a client that keeps the node's compression context reads of the bytes a gate wrote:
    /// each message's payload, inflated by one inflater for the whole connection where RSV1 is set.
    fn read_keeping_context(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut inflater = flate2::Decompress::new(false);
        let (mut at, mut read) = (0, Vec::new());
        while at < bytes.len() {
            let (len, head) = match bytes[at + 1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])), 4),
                127 => panic!("no frame here is that long"),
                n => (usize::from(n), 2),
            };
            let payload = &bytes[at + head..at + head + len];
            if wire::is_compressed(&bytes[at..]) {
                let mut message = Vec::with_capacity(1 << 16);
                let input = [payload, &[0, 0, 0xff, 0xff]].concat();
                inflater
                    .decompress_vec(&input, &mut message, flate2::FlushDecompress::Sync)
                    .expect("a deflate stream");
                read.push(message);
            } else {
                read.push(payload.to_vec());
            }
            at += head + len;
        }
        read
    }

    /// A room's chat line number `i` (about 300 B): its uncompressed frame.
    fn chat_line(i: usize) -> Bytes {
        let text =
            format!("line {i}: what a pass from midfield, the keeper was never going to reach that one; ").repeat(4);
        let env = crate::envelope::Envelope::to_room("chat", Bytes::from(format!("{:?}", &text[..280])));
        wire::broadcast_frame(crate::encoding::Encoding::Json, &env, 0).unwrap()
    }

    /// Lines `from..to` of `chain`: their uncompressed payloads, their frames compressed alone, and
    /// their links.
    fn chained(chain: &mut Chain, lines: std::ops::Range<usize>) -> (Vec<Vec<u8>>, Vec<Bytes>, Vec<Linked>) {
        let (mut payloads, mut frames, mut links) = (Vec::new(), Vec::new(), Vec::new());
        for i in lines {
            let plain = chat_line(i);
            let alone = wire::deflated(&plain, 0).unwrap();
            links.push(chain.add(&plain, &alone).map(Arc::new));
            payloads.push(wire::payload_of(&plain).unwrap().to_vec());
            frames.push(alone);
        }
        (payloads, frames, links)
    }

    use super::super::context::Chain;

    #[tokio::test]
    async fn a_socket_that_keeps_the_context_reads_every_frame_whatever_comes_between() {
        let gate = Gate::new(1 << 20);
        gate.keep_context();
        let outlet = TestOutlet::with_room(1 << 20);
        gate.attach(Box::new(outlet.clone()));
        // About 300 B a line: the chain refers back to the last two at most.
        let mut chain = Chain::new(700);
        let mut want = Vec::new();
        let (payloads, mut frames, links) = chained(&mut chain, 0..5);
        assert_eq!(gate.write_linked(&mut frames, &[], &links).1, 4, "all but the first");
        want.extend(payloads);
        // Another room's compressed frame: the next line cannot refer past it.
        let other = chat_line(99);
        gate.push(wire::deflated(&other, 0).unwrap());
        want.push(wire::payload_of(&other).unwrap().to_vec());
        let (payloads, mut frames, links) = chained(&mut chain, 5..10);
        assert_eq!(
            gate.write_linked(&mut frames, &[], &links).1,
            4,
            "the first after it goes alone"
        );
        want.extend(payloads);
        // An uncompressed frame (a reply) does not enter the client's window: the run goes on.
        let mut reply = wire::Payload::with_capacity(16);
        reply.put(br#"{"op":"ok","id":7}"#);
        gate.send(reply.text());
        want.push(br#"{"op":"ok","id":7}"#.to_vec());
        let (payloads, mut frames, links) = chained(&mut chain, 10..15);
        assert_eq!(gate.write_linked(&mut frames, &[], &links).1, 5);
        want.extend(payloads);
        gate.flush();
        assert_eq!(read_keeping_context(&outlet.out()), want);
        // A socket that does not keep the context gets the frames alone.
        let plain = Gate::new(1 << 20);
        let (_, mut frames, links) = chained(&mut chain, 15..17);
        let alone = frames.clone();
        assert_eq!(plain.write_linked(&mut frames, &[], &links).1, 0);
        assert_eq!(frames, alone);
    }

    #[tokio::test]
    async fn a_conflated_value_never_puts_a_compressed_frame_between_lines_read_in_a_row() {
        let gate = Gate::conflating(1 << 20, 100);
        gate.keep_context();
        let outlet = TestOutlet::with_room(0);
        gate.attach(Box::new(outlet.clone()));
        let (clocks, clock_tags): (Vec<Bytes>, Vec<Tag>) = (0..3).map(|i| keyed("clock", i)).unzip();
        assert_eq!(gate.write_through(&clocks, &clock_tags), Push::Queued, "past the mark");
        let mut chain = Chain::new(700);
        let (mut lines, mut frames, links) = chained(&mut chain, 0..2);
        assert_eq!(gate.write_linked(&mut frames, &[], &links).1, 1);
        // The key's value, small, goes uncompressed: it does not enter the client's window.
        let (small, tag) = keyed("score", 1);
        assert_eq!(gate.write_through(&[small], std::slice::from_ref(&tag)), Push::Queued);
        let (payloads, mut frames, links) = chained(&mut chain, 2..4);
        assert_eq!(gate.write_linked(&mut frames, &[], &links).1, 2, "the run goes on");
        lines.extend(payloads);
        // Its next value, large enough to go compressed, cannot take the small one's place between
        // the lines: it queues behind them.
        let mut env = crate::envelope::Envelope::to_room("m", Bytes::from(format!("{:?}", "2".repeat(400))));
        env.key = Some("score".into());
        let big = wire::broadcast_frame(crate::encoding::Encoding::Json, &env, 0).unwrap();
        let big_z = wire::deflated(&big, 0).unwrap();
        assert_eq!(gate.write_through(&[big_z], std::slice::from_ref(&tag)), Push::Queued);
        let (payloads, mut frames, links) = chained(&mut chain, 4..7);
        assert_eq!(
            gate.write_linked(&mut frames, &[], &links).1,
            2,
            "after the value, the first goes alone"
        );
        lines.extend(payloads);
        outlet.open(1 << 20);
        gate.drain().await.unwrap();
        let read = read_keeping_context(&outlet.out());
        let read_lines: Vec<Vec<u8>> = read
            .iter()
            .filter(|p| p.starts_with(br#"{"op":"msg","room":"chat""#))
            .cloned()
            .collect();
        assert_eq!(read_lines, lines, "every line read whole");
        let at = |payload: &[u8]| read.iter().position(|p| p == payload);
        let big_at = at(wire::payload_of(&big).unwrap()).expect("the value read");
        assert_eq!(Some(big_at), at(&lines[3]).map(|i| i + 1), "queued behind the lines");
    }
}
