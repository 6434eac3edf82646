//! Lanes: how every socket is written, once per turn of its lane, with everything its topics got
//! meanwhile, in one `writev` straight from the frames every socket shares.
//!
//! A delivery worker does not touch the sockets when a message arrives: the message's frames (one
//! per encoding in use, built once by [`frames_of`]) go to the topic's [`Recent`] list, numbered
//! from one node-wide sequence. Sockets are spread over lanes by their gate's address, and each
//! lane belongs to one worker. On a lane's turn its worker takes the topics with frames that lane
//! has not had yet and hands each member in the lane its share ([`super::writer`]): one lock and
//! one write per socket a turn, whatever the rate, and no per-frame, per-socket queueing in the
//! common case. A topic's frames are dropped once every lane had them, so a list holds at most a
//! period of its messages. A socket that joins sees only frames numbered after its join.
//!
//! A socket in several topics gets one write per topic with news on its lane's turn. When the
//! turns come is [`super::schedule`]'s.
//!
//! [`frames_of`] is where a message becomes bytes for the wire: one frame per encoding per node.
//! Frames of another form for the same message (compressed, compressed after the room's last
//! messages, or a delta to the key's last value) are built there too, once, and shared the same
//! way.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use tokio::sync::Notify;

use super::{
    context::{Chain, Linked},
    delta::Values,
    form::{Form, FORMS},
    gate::Gate,
    keyed::{Keyed, Tag},
};
use crate::{
    encoding::Encoding,
    envelope::Envelope,
    metrics::{self as m, Delivery},
    topic::Topic,
    wire::{broadcast_frame, deflated, is_compressed, keyed_frame, value_of, Carried},
};

/// Lanes when workers are few: ticks `P / 8` apart spread a node's writes over the period.
pub const LANES: usize = 8;

/// The lane of a gate among `lanes`, stable for its life: Fibonacci hashing of its address.
pub fn lane_of(gate: &Arc<Gate>, lanes: usize) -> usize {
    ((Arc::as_ptr(gate) as usize as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % lanes
}

/// How frames are shaped for the wire: `--compress-min-bytes`, `--compress-context` and
/// `--delta-full-every`.
#[derive(Debug, Clone, Copy)]
pub struct Shaping {
    pub compress_min_bytes: usize,
    /// How far back a room's compressed frames may refer, in bytes of its last compressed
    /// messages ([`super::context`]); 0: every frame is compressed alone.
    pub compress_context: usize,
    pub delta_full_every: u32,
}

impl Default for Shaping {
    fn default() -> Shaping {
        Shaping {
            compress_min_bytes: 200,
            compress_context: 0,
            delta_full_every: 50,
        }
    }
}

/// What a topic keeps of the messages it framed, to frame the next ones: per key the last value
/// (for deltas), and per encoding its last compressed messages (for frames compressed after them,
/// [`super::context`]). Made as they are first needed; it goes with the topic.
#[derive(Debug, Default)]
pub struct Kept {
    values: Option<Box<Values>>,
    chains: Option<Box<[Option<Chain>; 2]>>,
}

/// One message's frame in one form.
#[derive(Debug, Clone)]
pub struct Framed {
    /// The message whole: what every socket of the form can read.
    pub whole: Bytes,
    /// In a delta form, for a keyed message: the delta frame and its key (which says what it is
    /// based on), for the sockets whose last value of the key is that base.
    pub delta: Option<(Bytes, Arc<Keyed>)>,
    /// In a compressed form, with `--compress-context`: the message's place in the topic's chain,
    /// and its frame compressed after the messages before it.
    pub link: Linked,
    /// The length of the message's frame uncompressed and whole, for the bytes-saved metrics.
    pub full: u32,
}

/// Frames of one message, per form (`None`: no member reads that form, or it could not be
/// encoded).
pub type Frames = [Option<Framed>; FORMS];

/// One message's frames for a topic whose members read `forms` (members per form): each form in
/// use built once, shared by every socket of it; compression and deltas computed once, from what
/// the topic `kept`; `tag` is the message's key. What cannot be encoded is counted per member it
/// misses.
pub fn frames_of(
    env: &Envelope,
    shard: u32,
    forms: &[u32; FORMS],
    topic: &Topic,
    tag: &Tag,
    kept: &mut Kept,
    shaping: Shaping,
) -> Frames {
    let mut frames: Frames = Default::default();
    let mut unencodable = 0;
    let used = |f: Form| forms[f.index()] > 0;
    let keyed = tag.as_ref().filter(|k| k.seq > 0);
    // Deltas, where a socket reads keyed values as deltas: once per message, per encoding.
    let delta_users = |e: Encoding| {
        used(Form {
            encoding: e,
            deflate: false,
            delta: true,
        }) || used(Form {
            encoding: e,
            deflate: true,
            delta: true,
        })
    };
    let (base, deltas) = match keyed {
        Some(k) if Encoding::ALL.into_iter().any(delta_users) => {
            let bytes = Encoding::ALL.map(|e| delta_users(e).then(|| value_of(e, env).ok()).flatten());
            let next =
                kept.values
                    .get_or_insert_with(Box::default)
                    .next(&k.key, k.seq, bytes, shaping.delta_full_every);
            (next.base, next.deltas)
        }
        _ => (None, [None, None]),
    };
    let delta_tag = keyed.zip(base).map(|(k, base)| {
        Arc::new(Keyed {
            delta_of: Some(base),
            ..Keyed::clone(k)
        })
    });
    for encoding in Encoding::ALL {
        let mine: Vec<Form> = Form::all().filter(|f| f.encoding == encoding && used(*f)).collect();
        if mine.is_empty() {
            continue;
        }
        let plain = match broadcast_frame(encoding, env, shard) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(error = %e, topic = ?topic, "message cannot be encoded");
                unencodable += mine.iter().map(|f| forms[f.index()] as usize).sum::<usize>();
                continue;
            }
        };
        let full = plain.len() as u32;
        // For sockets that read deltas: the whole value as their base, and the delta to it.
        let (whole, delta) = match keyed {
            Some(_) if mine.iter().any(|f| f.delta) => {
                let whole = keyed_frame(encoding, env, shard, Carried::Whole).unwrap_or_else(|_| plain.clone());
                let delta = deltas[encoding.index()]
                    .as_ref()
                    .and_then(|d| keyed_frame(encoding, env, shard, Carried::Delta(d)).ok())
                    .filter(|d| d.len() < whole.len());
                (whole, delta)
            }
            _ => (plain.clone(), None),
        };
        // Compressed once each: an unkeyed message's frame is the same for both.
        let squeeze = |frame: &Bytes| deflated(frame, shaping.compress_min_bytes).unwrap_or_else(|| frame.clone());
        let deflating = mine.iter().any(|f| f.deflate);
        let small_plain = deflating.then(|| squeeze(&plain));
        // With a context, the message's link in the topic's chain, for every form whose frame is
        // the compressed plain one. A value a conflating socket may replace in its queue is no
        // link of a chain.
        let link = small_plain
            .as_ref()
            .filter(|small| {
                shaping.compress_context > 0 && is_compressed(small) && !tag.as_ref().is_some_and(|k| k.conflate)
            })
            .and_then(|small| {
                kept.chains.get_or_insert_with(Box::default)[encoding.index()]
                    .get_or_insert_with(|| Chain::new(shaping.compress_context))
                    .add(&plain, small)
                    .map(Arc::new)
            });
        for delta_form in [false, true] {
            let form = Form {
                encoding,
                deflate: false,
                delta: delta_form,
            };
            let (whole, delta) = if delta_form { (&whole, &delta) } else { (&plain, &None) };
            if used(form) {
                frames[form.index()] = Some(Framed {
                    whole: whole.clone(),
                    delta: delta.clone().zip(delta_tag.clone()),
                    link: None,
                    full,
                });
            }
            let form = Form { deflate: true, ..form };
            if let Some(small_plain) = small_plain.as_ref().filter(|_| used(form)) {
                let (small, link) = if whole.as_ptr() == plain.as_ptr() {
                    (small_plain.clone(), link.clone())
                } else {
                    (squeeze(whole), None)
                };
                frames[form.index()] = Some(Framed {
                    whole: small,
                    delta: delta.as_ref().map(squeeze).zip(delta_tag.clone()),
                    link,
                    full,
                });
            }
        }
    }
    if unencodable > 0 {
        m::delivered(&Delivery {
            unencodable,
            ..Delivery::default()
        });
    }
    frames
}

/// A topic's frames that some lane has not had yet.
#[derive(Debug)]
pub struct Recent {
    /// Oldest first, with their sequence numbers and keys.
    frames: VecDeque<(u64, Frames, Tag)>,
    /// Per lane: frames numbered below this went to it.
    done: Box<[u64]>,
}

impl Recent {
    /// The frames lane `lane` has not had yet, per form ([`Share`]); marks them had, and forgets
    /// those every lane had. True when nothing is left.
    pub fn take_for(&mut self, lane: usize, out: &mut [Share; FORMS]) -> bool {
        let from = self.done[lane];
        for (seq, frames, tag) in self.frames.iter().filter(|(seq, ..)| *seq >= from) {
            for (share, framed) in out.iter_mut().zip(frames) {
                if let Some(framed) = framed {
                    share.seqs.push(*seq);
                    share.frames.push(framed.whole.clone());
                    share.tags.push(tag.clone());
                    share.full.push(framed.full);
                    share.deltas.push(framed.delta.clone());
                    share.links.push(framed.link.clone());
                }
            }
        }
        if let Some((last, ..)) = self.frames.back() {
            self.done[lane] = last + 1;
        }
        let floor = self.done.iter().copied().min().unwrap_or(0);
        while self.frames.front().is_some_and(|(seq, ..)| *seq < floor) {
            self.frames.pop_front();
        }
        self.frames.is_empty()
    }
}

/// One form's frames for a lane's turn, oldest first, and their numbers.
#[derive(Debug, Default)]
pub struct Share {
    seqs: Vec<u64>,
    frames: Vec<Bytes>,
    tags: Vec<Tag>,
    /// Per frame, its length uncompressed and whole.
    full: Vec<u32>,
    /// Per frame, in a delta form: the delta frame of a keyed message, and its key.
    deltas: Vec<Option<(Bytes, Arc<Keyed>)>>,
    /// Per frame, in a compressed form with `--compress-context`: its link in the topic's chain.
    links: Vec<Linked>,
}

impl Share {
    /// The frames numbered `since` or later: what a socket that joined at `since` gets.
    pub fn since(&self, since: u64) -> &[Bytes] {
        &self.frames[self.from(since)..]
    }

    /// The keys of the frames [`Share::since`] gives, one per frame.
    pub fn tags_since(&self, since: u64) -> &[Tag] {
        &self.tags[self.from(since)..]
    }

    /// The uncompressed, whole lengths of the frames [`Share::since`] gives.
    pub fn full_since(&self, since: u64) -> &[u32] {
        &self.full[self.from(since)..]
    }

    /// The delta frames beside the frames [`Share::since`] gives.
    pub fn deltas_since(&self, since: u64) -> &[Option<(Bytes, Arc<Keyed>)>] {
        &self.deltas[self.from(since)..]
    }

    /// The links beside the frames [`Share::since`] gives.
    pub fn links_since(&self, since: u64) -> &[Linked] {
        &self.links[self.from(since)..]
    }

    fn from(&self, since: u64) -> usize {
        self.seqs.partition_point(|s| *s < since)
    }

    pub(crate) fn clear(&mut self) {
        self.seqs.clear();
        self.frames.clear();
        self.tags.clear();
        self.full.clear();
        self.deltas.clear();
        self.links.clear();
    }
}

/// The node's lanes: the shared sequence, per lane the topics with frames it has not had, and per
/// worker a wake-up for when one of its lanes gets news. Lane `k` is worker `k % workers`'s.
pub struct Lanes {
    next_seq: AtomicU64,
    dirty: Box<[Mutex<Vec<Topic>>]>,
    wake: Box<[Notify]>,
}

impl Lanes {
    pub fn new(lanes: usize, workers: usize) -> Lanes {
        Lanes {
            next_seq: AtomicU64::new(0),
            dirty: (0..lanes).map(|_| Mutex::new(Vec::new())).collect(),
            wake: (0..workers.max(1)).map(|_| Notify::new()).collect(),
        }
    }

    /// How many lanes adaptive writes use with `workers` workers: [`LANES`], or one per worker
    /// when they are more, a whole number per worker.
    pub fn adaptive(workers: usize) -> usize {
        let workers = workers.max(1);
        LANES.max(workers) / workers * workers
    }

    /// The lanes worker `me` writes.
    pub fn of_worker(&self, me: usize) -> Vec<usize> {
        (me..self.dirty.len()).step_by(self.wake.len()).collect()
    }

    pub fn count(&self) -> usize {
        self.dirty.len()
    }

    /// The number the next recorded frame gets: a joining socket sees frames from it on.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// Adds a message's frames to a topic's list (made when missing) and marks the topic for every
    /// lane that had all its frames so far. The caller holds the topic's entry exclusively.
    pub fn record(&self, topic: &Topic, recent: &mut Option<Box<Recent>>, frames: Frames, tag: Tag) {
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        let lanes = self.dirty.len();
        let recent = recent.get_or_insert_with(|| {
            Box::new(Recent {
                frames: VecDeque::new(),
                done: vec![seq; lanes].into(),
            })
        });
        let last = recent.frames.back().map(|(s, ..)| *s);
        for (lane, done) in recent.done.iter().enumerate() {
            // Clean (it had every frame so far): this frame makes the topic news for the lane.
            if last.is_none_or(|last| last < *done) {
                let mut dirty = self.lock(lane);
                dirty.push(topic.clone());
                if dirty.len() == 1 {
                    self.wake[lane % self.wake.len()].notify_one();
                }
            }
        }
        recent.frames.push_back((seq, frames, tag));
    }

    fn lock(&self, lane: usize) -> std::sync::MutexGuard<'_, Vec<Topic>> {
        // A list of names: consistent whatever panicked while holding it.
        self.dirty[lane].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any of `lanes` has news.
    pub(crate) fn news_for(&self, lanes: &[usize]) -> bool {
        lanes.iter().any(|lane| !self.lock(*lane).is_empty())
    }

    /// Ready when one of worker `me`'s lanes got news since it last waited here.
    pub(crate) async fn news(&self, me: usize) {
        self.wake[me].notified().await;
    }

    /// The topics with news for `lane`, leaving it empty.
    pub(crate) fn take_dirty(&self, lane: usize) -> Vec<Topic> {
        std::mem::take(&mut *self.lock(lane))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_news_for_each_lane_once_and_its_frames_go_once_every_lane_had_them() {
        let lanes = Lanes::new(2, 1);
        let topic = Topic::Room("r".into());
        let mut recent = None;
        let frame = |b: &'static [u8]| {
            let mut frames: Frames = Default::default();
            frames[0] = Some(Framed {
                whole: Bytes::from_static(b),
                delta: None,
                link: None,
                full: b.len() as u32,
            });
            frames
        };
        lanes.record(&topic, &mut recent, frame(b"a"), None);
        lanes.record(&topic, &mut recent, frame(b"b"), None);
        assert_eq!(lanes.take_dirty(0).len(), 1, "news once, however many frames");
        assert_eq!(lanes.take_dirty(1).len(), 1);
        let r = recent.as_mut().unwrap();
        let mut out: [Share; FORMS] = Default::default();
        assert!(!r.take_for(0, &mut out));
        assert_eq!(out[0].seqs, [0, 1]);
        assert_eq!(
            out[0].since(1),
            [Bytes::from_static(b"b")],
            "joined at 1: frame 0 is not its"
        );
        assert!(out[1].frames.is_empty());
        // Lane 0 is clean again, lane 1 still has two to take: a third frame is news for lane 0 only.
        lanes.record(&topic, &mut recent, frame(b"c"), None);
        assert_eq!(lanes.take_dirty(0).len(), 1);
        assert!(lanes.take_dirty(1).is_empty());
        let r = recent.as_mut().unwrap();
        let mut out: [Share; FORMS] = Default::default();
        assert!(!r.take_for(1, &mut out), "lane 0 has not had frame 2");
        assert_eq!(out[0].frames.len(), 3);
        assert_eq!(r.frames.len(), 1, "frames 0 and 1 went to both lanes: dropped");
        let mut out: [Share; FORMS] = Default::default();
        assert!(r.take_for(0, &mut out));
        assert_eq!(out[0].seqs, [2]);
        assert_eq!(lanes.next_seq(), 3);
    }

    #[test]
    fn with_a_context_a_message_is_linked_in_every_form_that_shares_its_compressed_frame() {
        let json = |deflate, delta| Form {
            encoding: Encoding::Json,
            deflate,
            delta,
        };
        let mut forms = [0; FORMS];
        forms[json(true, false).index()] = 1;
        forms[json(true, true).index()] = 1;
        let shaping = Shaping {
            compress_min_bytes: 0,
            compress_context: 4096,
            delta_full_every: 50,
        };
        let topic = Topic::Room("m".into());
        let mut kept = Kept::default();
        let line = |i: u64| {
            format!(
                "{:?}",
                format!("line {i}: what a pass from midfield, the keeper never reached it")
            )
        };
        let mut build = |i: u64, key: Option<(&str, bool)>| {
            let mut env = Envelope::to_room("m", Bytes::from(line(i)));
            env.key = key.map(|(k, _)| k.into());
            env.key_seq = key.map(|_| i);
            let tag: Tag = key.map(|(k, conflate)| {
                Arc::new(Keyed {
                    room: "m".into(),
                    key: k.into(),
                    seq: i,
                    conflate,
                    delta_of: None,
                })
            });
            let frames = frames_of(&env, 0, &forms, &topic, &tag, &mut kept, shaping);
            let link = |f: Form| frames[f.index()].as_ref().and_then(|f| f.link.clone());
            (link(json(true, false)), link(json(true, true)))
        };
        for i in 1..=3 {
            let (alone, delta) = build(i, None);
            let (alone, delta) = (alone.expect("linked"), delta.expect("the same frame: linked too"));
            assert_eq!((alone.n, delta.n, alone.frames.is_empty()), (i, i, i == 1));
        }
        // A keyed value: the delta form's frame is its own (whole, marked): not in the chain.
        let (alone, delta) = build(4, Some(("score", false)));
        assert_eq!((alone.map(|l| l.n), delta.map(|l| l.n)), (Some(4), None));
        // A value a conflating socket may replace: in no chain.
        let (alone, delta) = build(5, Some(("score", true)));
        assert!(alone.is_none() && delta.is_none());
        let (alone, _) = build(6, None);
        let alone = alone.expect("linked");
        let needs: Vec<u32> = alone.frames.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            (alone.n, needs.first()),
            (5, Some(&4)),
            "after the four before it: {needs:?}"
        );
        // Without a context nothing is chained.
        let shaping = Shaping {
            compress_context: 0,
            ..shaping
        };
        let env = Envelope::to_room("m", Bytes::from(line(7)));
        let frames = frames_of(&env, 0, &forms, &topic, &None, &mut Kept::default(), shaping);
        assert!(frames.iter().flatten().all(|f| f.link.is_none()));
    }
}
