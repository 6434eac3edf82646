//! The per-socket outbound queue, bounded by bytes like a browser's `bufferedAmount`.
//!
//! Producers (the fan-out loop, the session's own replies) never wait: [`Gate::push`] either queues
//! a frame or, when the frame would pass the budget, frees the whole queue and marks the gate
//! overflowed so the writer closes the socket with 4008. Bytes stay counted from the push until the
//! writer's flush of them completes, so a socket whose kernel buffer is full keeps its frames counted
//! and overflows instead of growing the node's memory.
//!
//! A std `Mutex` guards the queue: it is held for a push or a swap only, never across an `.await`,
//! and it is per socket, so it is never contended by more than one producer and the writer.

use std::{collections::VecDeque, sync::Mutex};

use axum::extract::ws::Message;
use tokio::sync::Notify;

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push passed the budget: the queue was freed and the socket is being dropped.
    Overflow,
    /// The gate was already overflowed or closing; the frame was discarded.
    Closed,
}

/// What the writer must do next.
#[derive(Debug)]
pub enum Next {
    /// Write the frames now in the writer's buffer, then call [`Gate::release`] with this many bytes.
    Frames(usize),
    /// Close with 4008 and end.
    Overflow,
    /// Write the frames already handed over, then close with this frame (or just end) and stop.
    Close(Option<(u16, &'static str)>),
}

#[derive(Debug)]
enum Status {
    Open,
    Overflowed,
    Closing(Option<(u16, &'static str)>),
}

#[derive(Debug)]
struct State {
    frames: VecDeque<Message>,
    /// Bytes queued plus bytes handed to the writer and not yet flushed.
    queued: usize,
    /// Bytes of `frames` alone.
    pending: usize,
    status: Status,
}

#[derive(Debug)]
pub struct Gate {
    state: Mutex<State>,
    notify: Notify,
    budget: usize,
}

/// Bytes a frame counts for against the budget.
pub fn frame_len(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(_) => 2,
    }
}

impl Gate {
    pub fn new(budget: usize) -> Gate {
        Gate {
            state: Mutex::new(State {
                frames: VecDeque::new(),
                queued: 0,
                pending: 0,
                status: Status::Open,
            }),
            notify: Notify::new(),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every change is one step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame without waiting.
    pub fn push(&self, msg: Message) -> Push {
        let len = frame_len(&msg);
        let mut st = self.lock();
        if !matches!(st.status, Status::Open) {
            return Push::Closed;
        }
        if st.queued + len > self.budget {
            st.status = Status::Overflowed;
            st.frames = VecDeque::new();
            st.pending = 0;
            drop(st);
            self.notify.notify_one();
            return Push::Overflow;
        }
        st.queued += len;
        st.pending += len;
        st.frames.push_back(msg);
        let first = st.frames.len() == 1;
        drop(st);
        // The writer drains everything each time, so only the first frame of a batch needs a wake.
        if first {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Asks the writer to send what is queued, then `frame` (if any), then stop. The first close wins.
    pub fn close(&self, frame: Option<(u16, &'static str)>) {
        let mut st = self.lock();
        if matches!(st.status, Status::Open) {
            st.status = Status::Closing(frame);
        }
        drop(st);
        self.notify.notify_one();
    }

    /// Waits for work; moves queued frames into `buf` (which must be empty).
    pub async fn next(&self, buf: &mut VecDeque<Message>) -> Next {
        loop {
            // Registered before the check, so a push between the check and the wait is not missed.
            let notified = self.notify.notified();
            {
                let mut st = self.lock();
                match st.status {
                    Status::Overflowed => return Next::Overflow,
                    Status::Open | Status::Closing(_) if !st.frames.is_empty() => {
                        std::mem::swap(&mut st.frames, buf);
                        let bytes = std::mem::take(&mut st.pending);
                        return Next::Frames(bytes);
                    }
                    Status::Closing(frame) => return Next::Close(frame),
                    Status::Open => {}
                }
            }
            notified.await;
        }
    }

    /// Appends whatever is queued now to `buf` without waiting; returns its bytes (to release).
    pub fn take(&self, buf: &mut VecDeque<Message>) -> usize {
        let mut st = self.lock();
        buf.append(&mut st.frames);
        std::mem::take(&mut st.pending)
    }

    /// Waits until the gate overflows; lets a writer stuck on a full socket give up.
    pub async fn overflowed(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_overflowed() {
                return;
            }
            notified.await;
        }
    }

    pub fn is_overflowed(&self) -> bool {
        matches!(self.lock().status, Status::Overflowed)
    }

    /// The writer flushed `bytes` to the socket.
    pub fn release(&self, bytes: usize) {
        let mut st = self.lock();
        st.queued = st.queued.saturating_sub(bytes);
    }

    /// Bytes counted against the budget now.
    pub fn queued(&self) -> usize {
        self.lock().queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Message {
        Message::Text("x".repeat(n).into())
    }

    #[tokio::test]
    async fn counts_bytes_until_released() {
        let gate = Gate::new(100);
        assert_eq!(gate.push(text(40)), Push::Queued);
        assert_eq!(gate.push(text(40)), Push::Queued);
        let mut buf = VecDeque::new();
        let Next::Frames(bytes) = gate.next(&mut buf).await else {
            panic!()
        };
        assert_eq!((bytes, buf.len()), (80, 2));
        // Handed to the writer but not flushed: still counted.
        assert_eq!(gate.queued(), 80);
        assert_eq!(gate.push(text(30)), Push::Overflow);
        assert!(gate.is_overflowed());
        assert_eq!(gate.push(text(1)), Push::Closed);
        assert!(matches!(gate.next(&mut VecDeque::new()).await, Next::Overflow));
    }

    #[tokio::test]
    async fn take_gathers_what_arrived_meanwhile() {
        let gate = Gate::new(1000);
        gate.push(text(10));
        let mut buf = VecDeque::new();
        let Next::Frames(first) = gate.next(&mut buf).await else {
            panic!()
        };
        gate.push(text(20));
        gate.push(text(30));
        assert_eq!(first + gate.take(&mut buf), 60);
        assert_eq!(buf.len(), 3);
        assert_eq!(gate.take(&mut buf), 0);
        assert_eq!(gate.queued(), 60, "counted until released");
    }

    #[tokio::test]
    async fn release_makes_room() {
        let gate = Gate::new(100);
        assert_eq!(gate.push(text(60)), Push::Queued);
        let mut buf = VecDeque::new();
        let Next::Frames(bytes) = gate.next(&mut buf).await else {
            panic!()
        };
        gate.release(bytes);
        assert_eq!(gate.queued(), 0);
        assert_eq!(gate.push(text(90)), Push::Queued);
    }

    #[tokio::test]
    async fn overflow_frees_the_queue() {
        let gate = Gate::new(1000);
        for _ in 0..9 {
            gate.push(text(100));
        }
        assert_eq!(gate.push(text(200)), Push::Overflow);
        let st = gate.lock();
        assert!(st.frames.is_empty() && st.frames.capacity() == 0);
    }

    #[tokio::test]
    async fn close_flushes_queued_frames_first() {
        let gate = Gate::new(1000);
        gate.push(text(10));
        gate.close(Some((4001, "drain")));
        gate.close(Some((1000, "late")));
        assert_eq!(gate.push(text(10)), Push::Closed);
        let mut buf = VecDeque::new();
        assert!(matches!(gate.next(&mut buf).await, Next::Frames(10)));
        buf.clear();
        assert!(matches!(gate.next(&mut buf).await, Next::Close(Some((4001, "drain")))));
    }

    #[tokio::test(start_paused = true)]
    async fn writer_wakes_on_push_and_overflow() {
        let gate = std::sync::Arc::new(Gate::new(10));
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.overflowed().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        gate.push(text(11));
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
