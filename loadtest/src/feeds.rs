//! Realistic payloads for the bytes-on-the-wire runs (`--feed`): what a publisher of the stadium
//! publishes instead of the padded stamp of [`crate::wire`], and the record of every value
//! published, which the viewers check what they rebuild against.
//!
//! - `scoreboard`: one match's state (teams, line-ups, score, clock, statistics, the last events)
//!   as JSON of about 2 KB under the key `match:P`, a few fields changed per message;
//! - `odds`: a table of markets and prices, 2 to 4 KB, under the key `odds:P`, one to three prices
//!   changed per message;
//! - `chat`: unkeyed lines of 100 to 400 bytes of varied text.
//!
//! Every value is a JSON object that starts `{"at":[P,SEQ,TS_US],`: the stamp a viewer reads the
//! publisher, sequence number and publish time from once it has the value whole. Generation is
//! seeded (`--feed-seed`) and its own small generator, so a seed gives the same values on every
//! build and machine.

use std::{fmt::Write, sync::OnceLock};

use bytes::Bytes;
use clap::ValueEnum;

use crate::wire::Stamp;

/// The feed publishers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Feed {
    /// A match's state, keyed, small changes per message.
    Scoreboard,
    /// An odds table of 2–4 KB, keyed, a few prices changing per message.
    Odds,
    /// Chat lines of 100–400 B, unkeyed.
    Chat,
}

impl Feed {
    /// Publisher `publisher`'s values, from `seed`.
    pub fn source(self, seed: u64, publisher: u32) -> Source {
        let mut rng = Rng::new(seed ^ (u64::from(publisher) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let state = match self {
            Feed::Scoreboard => State::Score(Box::new(Scoreboard::new(&mut rng))),
            Feed::Odds => State::Odds(Odds::new(&mut rng)),
            Feed::Chat => State::Chat,
        };
        let key = match self {
            Feed::Scoreboard => Some(format!("match:{publisher}")),
            Feed::Odds => Some(format!("odds:{publisher}")),
            Feed::Chat => None,
        };
        Source { key, rng, state }
    }
}

/// One publisher's sequence of values.
pub struct Source {
    key: Option<String>,
    rng: Rng,
    state: State,
}

enum State {
    Score(Box<Scoreboard>),
    Odds(Odds),
    Chat,
}

impl Source {
    /// The key its values are published under; `None` for an unkeyed feed.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The next value, as JSON text, carrying `stamp`.
    pub fn next(&mut self, stamp: Stamp) -> String {
        let mut out = format!(r#"{{"at":[{},{},{}],"#, stamp.publisher, stamp.seq, stamp.ts_us);
        match &mut self.state {
            State::Score(s) => {
                // The first value is the match as it stands; each later one a few seconds on.
                if stamp.seq > 0 {
                    s.step(&mut self.rng);
                }
                s.write(&mut out);
            }
            State::Odds(o) => {
                if stamp.seq > 0 {
                    o.step(&mut self.rng);
                }
                o.write(&mut out);
            }
            State::Chat => chat_line(&mut self.rng, &mut out),
        }
        out.push('}');
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The generator: splitmix64, small and the same everywhere.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
        &of[self.below(of.len() as u64) as usize]
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------------------------------------
// The scoreboard.

const FIRST: &[&str] = &[
    "A.", "B.", "C.", "D.", "E.", "F.", "G.", "H.", "J.", "K.", "L.", "M.", "N.", "O.", "P.", "R.", "S.", "T.",
];
const LAST: &[&str] = &[
    "Silva",
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Kowalski",
    "Haddad",
    "Tanaka",
    "Brennan",
    "Costa",
    "Ivanov",
    "Mensah",
    "Novak",
    "Ferreira",
    "Jansen",
    "Rossi",
    "Byrne",
    "Dubois",
    "Nakamura",
    "Santos",
    "Berg",
    "Keller",
    "Petrov",
    "Walsh",
    "Andersen",
    "Romero",
    "Yilmaz",
    "Fischer",
    "Quinn",
];
const CLUBS: &[(&str, &str)] = &[
    ("Northbridge Rovers", "NBR"),
    ("Castlegate Athletic", "CGA"),
    ("Harbour City", "HBC"),
    ("Redmoor United", "RMU"),
    ("Kingsford Albion", "KFA"),
    ("Eastwick Wanderers", "EWW"),
];
/// The eleven's positions, then the bench's.
const POSITIONS: [&str; 18] = [
    "GK", "RB", "CB", "CB", "LB", "DM", "CM", "CM", "RW", "ST", "LW", "GK", "DF", "DF", "MF", "MF", "FW", "FW",
];
const KINDS: &[&str] = &[
    "shot",
    "foul",
    "corner",
    "offside",
    "save",
    "yellow_card",
    "substitution",
];

struct Side {
    name: &'static str,
    short: &'static str,
    /// Shirt number, name and position of the eleven, then of the bench.
    lineup: Vec<(u32, String, &'static str)>,
    bench: Vec<(u32, String, &'static str)>,
    score: u32,
    shots: u32,
    on_target: u32,
    corners: u32,
    fouls: u32,
    offsides: u32,
    yellow: u32,
    red: u32,
    saves: u32,
}

impl Side {
    fn new(rng: &mut Rng, club: (&'static str, &'static str)) -> Side {
        let mut player = |i: usize| {
            let number = if i == 0 {
                1
            } else {
                2 + i as u32 + 3 * rng.below(3) as u32
            };
            (number, format!("{} {}", rng.pick(FIRST), rng.pick(LAST)), POSITIONS[i])
        };
        let lineup = (0..11).map(&mut player).collect();
        let bench = (11..18).map(&mut player).collect();
        Side {
            name: club.0,
            short: club.1,
            lineup,
            bench,
            score: 0,
            shots: 0,
            on_target: 0,
            corners: 0,
            fouls: 0,
            offsides: 0,
            yellow: 0,
            red: 0,
            saves: 0,
        }
    }

    fn write(&self, out: &mut String, possession: u32) {
        let _ = write!(
            out,
            r#"{{"name":"{}","short":"{}","score":{},"possession":{possession},"stats":{{"shots":{},"on_target":{},"corners":{},"fouls":{},"offsides":{},"yellow":{},"red":{},"saves":{}}},"lineup":["#,
            self.name,
            self.short,
            self.score,
            self.shots,
            self.on_target,
            self.corners,
            self.fouls,
            self.offsides,
            self.yellow,
            self.red,
            self.saves
        );
        players(out, &self.lineup);
        out.push_str(r#"],"bench":["#);
        players(out, &self.bench);
        out.push_str("]}");
    }
}

/// Players as a JSON list's items.
fn players(out: &mut String, list: &[(u32, String, &str)]) {
    for (i, (n, name, pos)) in list.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(out, r#"{sep}{{"n":{n},"name":"{name}","pos":"{pos}"}}"#);
    }
}

struct Scoreboard {
    home: Side,
    away: Side,
    /// Seconds played.
    clock: u32,
    /// The home side's share of possession, percent.
    possession: u32,
    /// The last events, oldest first, at most [`EVENTS`].
    events: Vec<String>,
}

/// Events the state keeps.
const EVENTS: usize = 5;

impl Scoreboard {
    fn new(rng: &mut Rng) -> Scoreboard {
        let h = rng.below(CLUBS.len() as u64) as usize;
        let a = (h + 1 + rng.below(CLUBS.len() as u64 - 1) as usize) % CLUBS.len();
        Scoreboard {
            home: Side::new(rng, CLUBS[h]),
            away: Side::new(rng, CLUBS[a]),
            clock: 60 * rng.below(80) as u32,
            possession: 50,
            events: Vec::new(),
        }
    }

    /// A few seconds of play: the clock, possession, and now and then an event.
    fn step(&mut self, rng: &mut Rng) {
        self.clock += 1 + rng.below(4) as u32;
        if rng.chance(30) {
            self.possession = (self.possession + rng.below(3) as u32).saturating_sub(1).clamp(30, 70);
        }
        if !rng.chance(25) {
            return;
        }
        let home = rng.chance(50);
        let side = if home { &mut self.home } else { &mut self.away };
        let goal = rng.chance(3);
        let kind = if goal { "goal" } else { *rng.pick(KINDS) };
        match kind {
            "goal" => {
                side.score += 1;
                side.shots += 1;
                side.on_target += 1;
            }
            "shot" => {
                side.shots += 1;
                side.on_target += u32::from(rng.chance(40));
            }
            "foul" => side.fouls += 1,
            "corner" => side.corners += 1,
            "offside" => side.offsides += 1,
            "save" => side.saves += 1,
            "yellow_card" => side.yellow += 1,
            _ => {}
        }
        let (n, player, _) = rng.pick(&side.lineup).clone();
        let event = format!(
            r#"{{"minute":{},"kind":"{kind}","team":"{}","player":"{player}","number":{n}}}"#,
            self.clock / 60 + 1,
            side.short
        );
        if self.events.len() == EVENTS {
            self.events.remove(0);
        }
        self.events.push(event);
    }

    fn write(&self, out: &mut String) {
        let half = if self.clock < 45 * 60 { 1 } else { 2 };
        let _ = write!(
            out,
            r#""competition":"Premier Division","venue":"{} Stadium","status":"live","period":{half},"clock":"{:02}:{:02}","home":"#,
            self.home.name,
            self.clock / 60,
            self.clock % 60
        );
        self.home.write(out, self.possession);
        out.push_str(r#","away":"#);
        self.away.write(out, 100 - self.possession);
        out.push_str(r#","events":["#);
        out.push_str(&self.events.join(","));
        out.push(']');
    }
}

// ---------------------------------------------------------------------------------------------
// The odds table.

const MARKETS: &[(&str, &[&str])] = &[
    ("Match result", &["Home", "Draw", "Away"]),
    ("Double chance", &["Home or draw", "Home or away", "Draw or away"]),
    ("Both teams to score", &["Yes", "No"]),
    ("Total goals 1.5", &["Over", "Under"]),
    ("Total goals 2.5", &["Over", "Under"]),
    ("Total goals 3.5", &["Over", "Under"]),
    ("Half-time result", &["Home", "Draw", "Away"]),
    ("Next goal", &["Home", "No goal", "Away"]),
    (
        "Correct score",
        &["1-0", "2-0", "2-1", "1-1", "0-0", "0-1", "0-2", "1-2"],
    ),
    ("Asian handicap -0.5", &["Home", "Away"]),
    ("Asian handicap +0.5", &["Home", "Away"]),
    ("Corners 9.5", &["Over", "Under"]),
    ("Cards 3.5", &["Over", "Under"]),
    ("Draw no bet", &["Home", "Away"]),
    ("First half goals 0.5", &["Over", "Under"]),
    ("Odd or even goals", &["Odd", "Even"]),
];

struct Odds {
    /// Per market, per selection: the price in hundredths and its last move (-1, 0, 1).
    prices: Vec<Vec<(u32, i8)>>,
    /// Bumped on every change, as a feed's version.
    version: u64,
}

impl Odds {
    fn new(rng: &mut Rng) -> Odds {
        let prices = MARKETS
            .iter()
            .map(|(_, sels)| sels.iter().map(|_| (105 + rng.below(900) as u32, 0)).collect())
            .collect();
        Odds {
            prices,
            version: 1 + rng.below(10_000),
        }
    }

    /// One to three prices move a tick or a few; the others' trends settle.
    fn step(&mut self, rng: &mut Rng) {
        for m in &mut self.prices {
            for p in m.iter_mut() {
                p.1 = 0;
            }
        }
        for _ in 0..1 + rng.below(3) {
            let m = rng.below(self.prices.len() as u64) as usize;
            let s = rng.below(self.prices[m].len() as u64) as usize;
            let by = 1 + rng.below(5) as u32;
            let p = &mut self.prices[m][s];
            if rng.chance(50) || p.0 < 110 {
                p.0 += by;
                p.1 = 1;
            } else {
                p.0 -= by;
                p.1 = -1;
            }
        }
        self.version += 1;
    }

    fn write(&self, out: &mut String) {
        let _ = write!(
            out,
            r#""event":"Northbridge Rovers v Castlegate Athletic","book":"in-play","version":{},"currency":"EUR","markets":["#,
            self.version
        );
        for (i, ((name, sels), prices)) in MARKETS.iter().zip(&self.prices).enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(
                out,
                r#"{sep}{{"id":"m{i}","name":"{name}","suspended":false,"selections":["#
            );
            for (j, (sel, (price, trend))) in sels.iter().zip(prices).enumerate() {
                let sep = if j == 0 { "" } else { "," };
                let _ = write!(
                    out,
                    r#"{sep}{{"id":"m{i}s{j}","name":"{sel}","price":{}.{:02},"trend":{trend}}}"#,
                    price / 100,
                    price % 100
                );
            }
            out.push_str("]}");
        }
        out.push(']');
    }
}

// ---------------------------------------------------------------------------------------------
// Chat.

const OPENERS: &[&str] = &[
    "honestly",
    "wow",
    "come on",
    "no way",
    "ok so",
    "lol",
    "right",
    "well",
    "look",
    "seriously",
];
const WORDS: &[&str] = &[
    "the",
    "keeper",
    "was",
    "never",
    "going",
    "to",
    "reach",
    "that",
    "one",
    "and",
    "referee",
    "needs",
    "glasses",
    "what",
    "a",
    "pass",
    "from",
    "midfield",
    "we",
    "are",
    "playing",
    "so",
    "much",
    "better",
    "since",
    "half",
    "time",
    "their",
    "defence",
    "looks",
    "tired",
    "if",
    "he",
    "scores",
    "again",
    "I",
    "will",
    "buy",
    "everyone",
    "here",
    "drink",
    "tonight",
    "why",
    "did",
    "coach",
    "take",
    "off",
    "our",
    "best",
    "striker",
    "this",
    "crowd",
    "is",
    "unbelievable",
    "can",
    "hear",
    "it",
    "on",
    "stream",
    "too",
    "offside",
    "by",
    "mile",
    "VAR",
    "checking",
    "for",
    "ages",
    "corner",
    "should",
    "have",
    "been",
    "penalty",
    "great",
    "save",
    "left",
    "back",
    "is",
    "having",
    "nightmare",
    "weather",
    "looks",
    "awful",
    "pitch",
    "slippery",
    "anyone",
    "know",
    "who",
    "replaced",
    "number",
    "nine",
    "second",
    "yellow",
    "surely",
    "goal",
    "line",
    "technology",
    "says",
    "in",
    "three",
    "points",
    "would",
    "be",
    "huge",
    "table",
    "title",
    "race",
    "still",
    "open",
    "my",
    "heart",
    "cannot",
    "take",
    "more",
    "of",
    "minutes",
    "added",
    "on",
    "fans",
    "singing",
    "away",
    "end",
    "has",
    "gone",
    "quiet",
    "shot",
    "over",
    "bar",
    "header",
    "wide",
    "post",
];
const ENDS: &[&str] = &[".", "!", "?", "!!", "...", " :)", " haha", ""];
const USERS: &[&str] = &[
    "maria_k",
    "dan.the.fan",
    "ultras1907",
    "jo",
    "keeper_cam",
    "north_stand",
    "liv",
    "stats_guy",
    "bex",
    "old_timer_63",
    "ninja_winger",
    "sam",
];

/// One chat line: `"user":…,"badge":…,"text":…` after the stamp in `out`, with the text sized so the whole value
/// (stamp and braces included) is 100–400 bytes.
fn chat_line(rng: &mut Rng, out: &mut String) {
    let target = 100 + rng.below(301) as usize;
    let _ = write!(out, r#""user":"{}","badge":{},"text":""#, rng.pick(USERS), rng.below(5));
    // `out` is the value so far; the closing `"}` is to come.
    let text_len = target.saturating_sub(out.len() + 2).max(8);
    let mut text = String::with_capacity(text_len + 16);
    while text.len() < text_len {
        let mut sentence = String::from(*rng.pick(OPENERS));
        for _ in 0..3 + rng.below(9) {
            sentence.push(' ');
            sentence.push_str(rng.pick::<&str>(WORDS));
        }
        sentence.push_str(rng.pick::<&str>(ENDS));
        if let Some(first) = sentence.get(..1) {
            let upper = first.to_uppercase();
            sentence.replace_range(..1, &upper);
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&sentence);
    }
    text.truncate(text_len);
    out.push_str(text.trim_end());
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// What was published.

/// Every value each publisher published, by sequence number, for the viewers to check what they
/// rebuild against: written once by its publisher before the publish goes out, read by every
/// viewer without a lock. Bounded: a publisher records at most `per_publisher` values; later ones
/// cannot be checked and are counted so.
pub struct Published {
    values: Vec<Vec<OnceLock<Bytes>>>,
}

/// What a rebuilt value is, held against what was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Same,
    Different,
    /// Nothing recorded under its stamp (past the bound, or a stamp never published).
    Unknown,
}

impl Published {
    pub fn new(publishers: usize, per_publisher: usize) -> Published {
        Published {
            values: (0..publishers)
                .map(|_| (0..per_publisher).map(|_| OnceLock::new()).collect())
                .collect(),
        }
    }

    /// Records publisher `publisher`'s value number `seq`.
    pub fn record(&self, publisher: u32, seq: u64, value: Bytes) {
        if let Some(slot) = self.slot(publisher, seq) {
            let _ = slot.set(value);
        }
    }

    pub fn check(&self, publisher: u32, seq: u64, rebuilt: &[u8]) -> Check {
        match self.slot(publisher, seq).and_then(OnceLock::get) {
            Some(v) if v[..] == *rebuilt => Check::Same,
            Some(_) => Check::Different,
            None => Check::Unknown,
        }
    }

    fn slot(&self, publisher: u32, seq: u64) -> Option<&OnceLock<Bytes>> {
        self.values.get(publisher as usize)?.get(usize::try_from(seq).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(seq: u64) -> Stamp {
        Stamp {
            publisher: 2,
            seq,
            ts_us: 1_790_000_000_000_000 + seq * 5000,
        }
    }

    fn values(feed: Feed, seed: u64, n: u64) -> Vec<String> {
        let mut s = feed.source(seed, 2);
        (0..n).map(|i| s.next(stamp(i))).collect()
    }

    #[test]
    fn a_seed_gives_the_same_values_and_another_seed_others() {
        for feed in [Feed::Scoreboard, Feed::Odds, Feed::Chat] {
            let a = values(feed, 7, 50);
            assert_eq!(a, values(feed, 7, 50), "{feed:?}");
            assert_ne!(a, values(feed, 8, 50), "{feed:?}");
            for v in &a {
                let parsed: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|e| panic!("{e}: {v}"));
                assert_eq!(parsed["at"][0], 2);
            }
            assert!(a[3].starts_with(r#"{"at":[2,3,"#));
        }
    }

    /// The size of the fossil delta from `a` to `b`: how much changed.
    fn changed(a: &str, b: &str) -> usize {
        fossil_delta::delta(b, a).len()
    }

    #[test]
    fn keyed_feeds_change_a_little_per_message() {
        let score = values(Feed::Scoreboard, 1, 400);
        let sizes: Vec<usize> = score.iter().map(String::len).collect();
        assert!(sizes.iter().all(|s| (1800..3000).contains(s)), "{:?}", &sizes[..5]);
        // The stamp's time and the clock change every time; the rest now and then.
        let deltas: Vec<usize> = score.windows(2).map(|w| changed(&w[0], &w[1])).collect();
        let mean = deltas.iter().sum::<usize>() as f64 / deltas.len() as f64;
        assert!(mean < 100.0, "mean delta {mean}");
        assert!(score.windows(2).all(|w| w[0] != w[1]));

        let odds = values(Feed::Odds, 1, 400);
        assert!(
            odds.iter().all(|v| (2048..=4096).contains(&v.len())),
            "{}",
            odds[0].len()
        );
        // One to three prices with their trends (and the trends of the last ones settling), the
        // version and the time.
        let deltas: Vec<usize> = odds.windows(2).map(|w| changed(&w[0], &w[1])).collect();
        assert!(deltas.iter().all(|d| (10..400).contains(d)), "{deltas:?}");
        let mean = deltas.iter().sum::<usize>() as f64 / deltas.len() as f64;
        assert!(
            mean < 0.05 * odds[0].len() as f64,
            "mean delta {mean} of {}",
            odds[0].len()
        );
    }

    #[test]
    fn chat_lines_are_100_to_400_bytes_of_varied_text() {
        let lines = values(Feed::Chat, 3, 500);
        assert!(
            lines.iter().all(|l| (100..=400).contains(&l.len())),
            "{:?}",
            lines.iter().map(String::len).min()
        );
        let short = lines.iter().filter(|l| l.len() < 200).count();
        let long = lines.iter().filter(|l| l.len() > 300).count();
        assert!(short > 100 && long > 100, "spread: {short} short, {long} long");
        let distinct: std::collections::BTreeSet<_> = lines.iter().map(|l| &l[l.find("text").unwrap()..]).collect();
        assert_eq!(distinct.len(), lines.len(), "no line twice");
        assert_eq!(Feed::Chat.source(3, 0).key(), None);
        assert_eq!(Feed::Odds.source(3, 4).key(), Some("odds:4"));
    }

    #[test]
    fn a_rebuilt_value_is_checked_against_the_published_one() {
        let p = Published::new(2, 3);
        p.record(1, 2, Bytes::from_static(b"abc"));
        p.record(1, 9, Bytes::from_static(b"past the bound"));
        assert_eq!(p.check(1, 2, b"abc"), Check::Same);
        assert_eq!(p.check(1, 2, b"abd"), Check::Different);
        assert_eq!(p.check(1, 9, b"past the bound"), Check::Unknown);
        assert_eq!(p.check(0, 2, b"abc"), Check::Unknown);
        assert_eq!(p.check(7, 0, b"abc"), Check::Unknown);
    }
}
