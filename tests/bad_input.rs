//! Bad input, proved: property tests over every request message of
//! `ivschat.rooms.v1.RoomService`, sent to the real server (port 0, the
//! emulator upstream, one server per test function).
//!
//! Every case breaks at least one of the contract's constraints (often several,
//! beside values exactly at a limit, which must pass), and every case must be
//! refused with the right code: INVALID_ARGUMENT whose `google.rpc.BadRequest`
//! names exactly the offending fields in proto snake_case, or OUT_OF_RANGE
//! (larger than `--max-request-size`, or a watch from a revision in the
//! future). After every case: no call reached IVS Chat (the emulator's
//! counters, all operations: the test server does not reconcile during a
//! test), IVS Chat's rooms are unchanged, the change log's revision (ListRooms'
//! `revision`) is unchanged, and the server still answers (that ListRooms).
//!
//! A request that breaks several constraints may be refused for the first
//! stage that fails (e.g. the identifier before the patch): its expectation is
//! a list of groups, each the violations of one stage, and the server must
//! name exactly the fields of one or more whole groups.
//!
//! Invalid UTF-8 cannot be sent through a typed client, so
//! `invalid_utf8_and_malformed_protobuf` hand-encodes protobuf bytes and sends
//! them through a codec over raw bytes.
//!
//! Each test prints how many cases it ran (`--nocapture` shows it) and asserts
//! a floor. The runner's RNG is seeded: every run sends the same cases.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{TestDb, TestServer, proto, setup};
use ivschat_rooms::domain::Room;
use ivschat_rooms::emulator::{Emulator, Operation};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use prost::Message as _;
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// The server's `--max-request-size` in these tests: room for a few huge
/// strings in one request, and one case above it.
const MAX_REQUEST_SIZE: usize = 2 * 1024 * 1024;
/// The largest huge string, in bytes: five of them (the most string fields a
/// request here carries) stay below `MAX_REQUEST_SIZE`.
const HUGE_BYTES: usize = 380_000;
/// A request this large (encoded) counts as huge in the report.
const HUGE_REQUEST: usize = 100_000;
/// Cases per message; the floor each test asserts.
const CASES: u32 = 256;

const SERVICE: &str = "/ivschat.rooms.v1.RoomService/";
const ROOM_PREFIX: &str = "arn:aws:ivschat:us-east-1:123456789012:room/";
const LOGGING_PREFIX: &str = "arn:aws:ivschat:us-east-1:123456789012:logging-configuration/";
const LAMBDA_PREFIX: &str = "arn:aws:lambda:us-east-1:123456789012:function:";
const REQUEST_ID_TAG: &str = "ivschat-rooms:request-id";

/// `[a-zA-Z0-9-_]`: RoomName's characters.
const NAME_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
/// `[a-zA-Z0-9-]`: the last part of room and logging-configuration ARNs.
const ID_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
/// `[a-zA-Z0-9._:-]`: request_id's characters.
const REQUEST_ID_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-";
/// Any characters, one to four bytes each: lengths are counted in characters.
const ANY_CHARS: &str = "aZ9 \"\\\t\0é€𝄞中\u{202e}\u{feff}\u{10ffff}:/.";
/// Like ANY_CHARS, without a newline or anything else `.` does not match.
const DOT_CHARS: &str = "aZ9 é€𝄞中\"\\:/.";
/// One of these breaks RoomName's pattern wherever it stands.
const NOT_NAME: &[char] = &[' ', '.', ':', '/', 'é', '€', '𝄞', '\0', '\n', '+', '"'];
/// One of these breaks an ARN pattern (room, logging configuration, Lambda
/// prefix) wherever it stands: no class and no literal of those holds it.
const NOT_ARN: &[char] = &[' ', '_', '.', '#', 'é', '€', '𝄞', '\0', '\n', '"'];
/// One of these breaks request_id's pattern.
const NOT_REQUEST_ID: &[char] = &[' ', '_', '/', '@', '+', 'é', '𝄞', '\0', '\n'];

// ---------------------------------------------------------------------------
// The server under test and the checks after every case.

/// What a case must not change.
#[derive(Debug, PartialEq)]
struct State {
    calls: Vec<(Operation, u64)>,
    rooms: Vec<Room>,
    revision: u64,
}

/// What a case must be answered with.
#[derive(Debug, Clone)]
enum Expect {
    /// INVALID_ARGUMENT naming exactly the fields of one or more of these
    /// groups (empty groups are ignored; at least one is not empty).
    Invalid(Vec<BTreeSet<String>>),
    /// INVALID_ARGUMENT without a field (a malformed message that names none).
    InvalidNoField,
    /// OUT_OF_RANGE; with a reason, a `google.rpc.ErrorInfo` giving it.
    OutOfRange(Option<&'static str>),
}

impl Expect {
    fn groups(groups: impl IntoIterator<Item = BTreeSet<String>>) -> Option<Expect> {
        let groups: Vec<_> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        (!groups.is_empty()).then_some(Expect::Invalid(groups))
    }
}

/// One field, as a group.
fn one(field: impl Into<String>) -> BTreeSet<String> {
    BTreeSet::from([field.into()])
}

struct Harness {
    server: TestServer,
    emulator: Emulator,
    /// A room that exists, target of the methods that take an identifier.
    room: proto::Room,
    before: State,
    cases: AtomicUsize,
    huge: AtomicUsize,
    /// Refusals that named only the first of their violations.
    omitted: AtomicUsize,
    _db: TestDb,
}

impl Harness {
    async fn start() -> Harness {
        let db = TestDb::sqlite();
        let size = MAX_REQUEST_SIZE.to_string();
        let (mut server, emulator, _) = setup(&db, &["--max-request-size", &size]).await;
        let room = server
            .client
            .create_room(proto::CreateRoomRequest {
                name: "target".into(),
                tags: HashMap::from([("keep".into(), "me".into())]),
                ..Default::default()
            })
            .await
            .expect("create the target room")
            .into_inner();
        let mut harness = Harness {
            server,
            emulator,
            room,
            before: State {
                calls: Vec::new(),
                rooms: Vec::new(),
                revision: 0,
            },
            cases: AtomicUsize::new(0),
            huge: AtomicUsize::new(0),
            omitted: AtomicUsize::new(0),
            _db: db,
        };
        harness.before = harness.state().await.expect("the baseline state");
        assert!(harness.before.revision > 0, "the creation is in the log");
        harness
    }

    fn client(&self) -> proto::room_service_client::RoomServiceClient<tonic::transport::Channel> {
        self.server
            .client
            .clone()
            .max_decoding_message_size(usize::MAX)
    }

    async fn state(&self) -> Result<State, String> {
        let listing = self
            .client()
            .list_rooms(proto::ListRoomsRequest::default())
            .await
            .map_err(|s| format!("the server no longer answers ListRooms: {s:?}"))?
            .into_inner();
        let mut rooms = self.emulator.rooms();
        rooms.sort_by(|a, b| a.arn.cmp(&b.arn));
        Ok(State {
            calls: Operation::ALL
                .iter()
                .map(|op| (*op, self.emulator.calls(*op)))
                .collect(),
            rooms,
            revision: listing.revision,
        })
    }

    /// Checks one answer against what was expected, then that nothing
    /// changed and the server still answers.
    async fn check<T: Debug>(
        &self,
        size: usize,
        answer: Result<T, Status>,
        expect: &Expect,
    ) -> Result<(), String> {
        self.cases.fetch_add(1, Ordering::Relaxed);
        if size >= HUGE_REQUEST {
            self.huge.fetch_add(1, Ordering::Relaxed);
        }
        let status = match answer {
            Ok(answer) => return Err(short(format!("accepted: {answer:?}; expected {expect:?}"))),
            Err(status) => status,
        };
        let fields: BTreeSet<String> = status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        // A refusal that breaks very many constraints names those that fit in
        // its size bound, and counts the rest.
        let some_omitted = status.message().ends_with("more violations");
        let ok = match expect {
            Expect::Invalid(groups) if some_omitted => {
                status.code() == Code::InvalidArgument
                    && !fields.is_empty()
                    && unions(groups).any(|u| fields.is_subset(&u))
            }
            Expect::Invalid(groups) => {
                status.code() == Code::InvalidArgument && unions(groups).any(|u| u == fields)
            }
            Expect::InvalidNoField => status.code() == Code::InvalidArgument && fields.is_empty(),
            Expect::OutOfRange(reason) => {
                status.code() == Code::OutOfRange
                    && reason.is_none_or(|r| {
                        status.get_details_error_info().map(|i| i.reason).as_deref() == Some(r)
                    })
            }
        };
        if !ok {
            return Err(short(format!(
                "expected {expect:?}, got {:?} {:?} naming {fields:?}",
                status.code(),
                status.message()
            )));
        }
        // What clients must read in trailers (16 KiB in hyper, 8 KiB in gRPC
        // core, for all of them).
        let trailer = status.message().len() + status.details().len();
        if trailer > 6 * 1024 {
            return Err(format!("a refusal of {trailer} bytes"));
        }
        self.omitted
            .fetch_add(usize::from(some_omitted), Ordering::Relaxed);
        let after = self.state().await?;
        if after != self.before {
            return Err(short(format!(
                "the case changed something: before {:?}, after {after:?}",
                self.before
            )));
        }
        Ok(())
    }

    /// Runs `cases` cases of `strategy` through `case`, with a seeded RNG,
    /// shrinking a failure. The harness's server runs on the test's runtime,
    /// so the runner (which is synchronous) runs in `block_in_place`.
    fn run<S>(&self, cases: u32, strategy: S, case: impl AsyncFn(S::Value) -> Result<(), String>)
    where
        S: Strategy,
        S::Value: Debug,
    {
        let config = Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 128,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
        let runtime = tokio::runtime::Handle::current();
        let result = tokio::task::block_in_place(|| {
            runner.run(&strategy, |value| {
                runtime.block_on(case(value)).map_err(TestCaseError::fail)
            })
        });
        if let Err(e) = result {
            panic!("{}", short(e.to_string()));
        }
    }

    /// Reports the number of cases run and asserts the floors; then checks
    /// that the server still serves a valid request of every kind.
    async fn finish(self, message: &str, min_huge: usize) {
        let cases = self.cases.load(Ordering::Relaxed);
        let huge = self.huge.load(Ordering::Relaxed);
        let omitted = self.omitted.load(Ordering::Relaxed);
        eprintln!(
            "bad_input {message}: {cases} cases ({huge} huge, {omitted} refusals too long to name every violation)"
        );
        assert!(cases >= CASES as usize, "{message}: only {cases} cases ran");
        assert!(huge >= min_huge, "{message}: only {huge} huge cases ran");
        let mut client = self.client();
        let got = client
            .get_room(proto::GetRoomRequest {
                identifier: self.room.arn.clone(),
                consistency: 0,
            })
            .await
            .expect("a valid GetRoom is still served")
            .into_inner();
        assert_eq!(got, self.room);
        let mut watch = client
            .watch_rooms(proto::WatchRoomsRequest::default())
            .await
            .expect("a valid WatchRooms is still served")
            .into_inner();
        assert!(matches!(
            watch.message().await,
            Ok(Some(proto::WatchRoomsResponse {
                kind: Some(proto::watch_rooms_response::Kind::Progress(_))
            }))
        ));
        let updated = client
            .update_room(proto::UpdateRoomRequest {
                identifier: self.room.arn.clone(),
                name: Some("still-served".into()),
                ..Default::default()
            })
            .await
            .expect("a valid UpdateRoom is still served")
            .into_inner();
        assert_eq!(updated.name, "still-served");
    }
}

/// Every union of a non-empty subset of `groups`.
fn unions(groups: &[BTreeSet<String>]) -> impl Iterator<Item = BTreeSet<String>> + '_ {
    (1u32..1 << groups.len()).map(move |mask| {
        groups
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .flat_map(|(_, g)| g.iter().cloned())
            .collect()
    })
}

/// Failure messages without the megabytes of a huge case: runs of one
/// character are counted, not repeated, and the whole is cut at 8,000.
fn short(s: String) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        let mut run = 1;
        while chars.peek() == Some(&c) {
            chars.next();
            run += 1;
        }
        if run > 8 {
            out.push_str(&format!("{c}<x{run}>"));
        } else {
            out.extend(std::iter::repeat_n(c, run));
        }
    }
    if out.len() > 8000 {
        let mut end = 8000;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("... (cut)");
    }
    out
}

// ---------------------------------------------------------------------------
// Strings: exact lengths in characters, patterns broken by one character,
// huge values.

/// `len` characters cycling through `alphabet` from a chosen start.
fn cycled(alphabet: &'static str, len: usize) -> BoxedStrategy<String> {
    let chars: Vec<char> = alphabet.chars().collect();
    (0..chars.len())
        .prop_map(move |start| (0..len).map(|i| chars[(start + i) % chars.len()]).collect())
        .boxed()
}

/// Strings of one of `lens` characters from `alphabet`.
fn of_lengths(alphabet: &'static str, lens: &[usize]) -> BoxedStrategy<String> {
    select(lens.to_vec())
        .prop_flat_map(move |n| cycled(alphabet, n))
        .boxed()
}

/// `prefix` then characters from `alphabet`, `total` characters in all.
fn prefixed(prefix: &'static str, alphabet: &'static str, total: usize) -> BoxedStrategy<String> {
    let rest = total - prefix.chars().count();
    cycled(alphabet, rest)
        .prop_map(move |rest| format!("{prefix}{rest}"))
        .boxed()
}

/// `prefixed` with a total length drawn from `lens`.
fn prefixed_of(
    prefix: &'static str,
    alphabet: &'static str,
    lens: &[usize],
) -> BoxedStrategy<String> {
    select(lens.to_vec())
        .prop_flat_map(move |n| prefixed(prefix, alphabet, n))
        .boxed()
}

/// `valid` with the character at a chosen position among its first `within`
/// (all when `None`) replaced by one of `bad`: the same length, one character
/// off the pattern.
fn broken(
    valid: BoxedStrategy<String>,
    within: Option<usize>,
    bad: &'static [char],
) -> BoxedStrategy<String> {
    (valid, any::<Index>(), select(bad))
        .prop_map(move |(s, at, c)| {
            let mut chars: Vec<char> = s.chars().collect();
            if chars.is_empty() {
                return c.to_string();
            }
            let i = at.index(within.unwrap_or(chars.len()).min(chars.len()));
            chars[i] = c;
            chars.into_iter().collect()
        })
        .boxed()
}

/// A huge string: `prefix`, then one character of `alphabet` repeated, up to
/// `HUGE_BYTES` bytes (always longer than any limit in characters).
fn huge(prefix: &'static str, alphabet: &'static str) -> BoxedStrategy<String> {
    let chars: Vec<char> = alphabet.chars().collect();
    (select(chars), 10_000usize..=HUGE_BYTES)
        .prop_map(move |(c, bytes)| {
            format!("{prefix}{}", c.to_string().repeat(bytes / c.len_utf8()))
        })
        .boxed()
}

/// A value and whether the contract accepts it.
type Judged<T> = (T, bool);

fn valid(s: BoxedStrategy<String>) -> BoxedStrategy<Judged<String>> {
    s.prop_map(|s| (s, true)).boxed()
}

fn invalid(s: BoxedStrategy<String>) -> BoxedStrategy<Judged<String>> {
    s.prop_map(|s| (s, false)).boxed()
}

/// RoomName: 0-128 characters of `[a-zA-Z0-9-_]`.
fn room_name() -> BoxedStrategy<Judged<String>> {
    prop_oneof![
        valid(of_lengths(NAME_CHARS, &[0, 1, 127, 128])),
        invalid(of_lengths(NAME_CHARS, &[129, 130])),
        invalid(
            (1usize..=128)
                .prop_flat_map(|n| broken(cycled(NAME_CHARS, n), None, NOT_NAME))
                .boxed()
        ),
        // 128 characters, 256 bytes and more: still off the pattern.
        invalid(of_lengths("é€𝄞", &[1, 128])),
        invalid(huge("", "a-é𝄞")),
    ]
    .boxed()
}

/// A room ARN the contract refuses: empty, 129 characters, off the pattern by
/// one character, another resource, huge.
fn bad_room_arn() -> BoxedStrategy<String> {
    let shortest = ROOM_PREFIX.len() + 1;
    prop_oneof![
        Just(String::new()),
        prefixed_of(ROOM_PREFIX, ID_CHARS, &[129, 130]),
        (shortest..=128)
            .prop_flat_map(|n| broken(prefixed(ROOM_PREFIX, ID_CHARS, n), None, NOT_ARN))
            .boxed(),
        prefixed_of(LOGGING_PREFIX, ID_CHARS, &[LOGGING_PREFIX.len() + 1, 128]),
        of_lengths(ID_CHARS, &[1, 12, 128]),
        huge(ROOM_PREFIX, "aZ9-é𝄞"),
    ]
    .boxed()
}

/// A room identifier: the target room, a well-formed ARN of up to 128
/// characters of a room that does not exist, or a bad one.
fn room_identifier(target: String) -> BoxedStrategy<Judged<String>> {
    prop_oneof![
        1 => Just((target, true)),
        1 => valid(prefixed_of(ROOM_PREFIX, ID_CHARS, &[ROOM_PREFIX.len() + 1, 128])),
        3 => invalid(bad_room_arn()),
        // Well formed, in a region not served: refused, nothing sent.
        1 => invalid(Just("arn:aws:ivschat:eu-west-1:123456789012:room/abcdEFGH1234".to_owned()).boxed()),
    ]
    .boxed()
}

/// LambdaArn: empty, or 0-170 characters matching
/// `arn:aws:lambda:[a-z0-9-]+:[0-9]{12}:function:.+`.
fn lambda_arn() -> BoxedStrategy<Judged<String>> {
    let lens = [LAMBDA_PREFIX.len() + 1, 169, 170];
    prop_oneof![
        Just((String::new(), true)),
        // The function's name is `.+`: multi-byte characters count once.
        valid(prefixed_of(LAMBDA_PREFIX, DOT_CHARS, &lens)),
        invalid(prefixed_of(LAMBDA_PREFIX, DOT_CHARS, &[171, 172])),
        invalid(broken(
            prefixed_of(LAMBDA_PREFIX, DOT_CHARS, &lens),
            Some(LAMBDA_PREFIX.len()),
            NOT_ARN
        )),
        invalid(Just("arn:aws:lambda:us-east-1:12345678901:function:f".to_owned()).boxed()),
        invalid(Just("arn:aws:sqs:us-east-1:123456789012:queue".to_owned()).boxed()),
        invalid(huge(LAMBDA_PREFIX, "aé𝄞")),
    ]
    .boxed()
}

/// LoggingConfigurationIdentifier, huge values left to `with_huge`.
fn logging_identifier(with_huge: bool) -> BoxedStrategy<Judged<String>> {
    let lens = [LOGGING_PREFIX.len() + 1, 127, 128];
    let mut options = vec![
        valid(prefixed_of(LOGGING_PREFIX, ID_CHARS, &lens)),
        invalid(Just(String::new()).boxed()),
        invalid(prefixed_of(LOGGING_PREFIX, ID_CHARS, &[129, 130])),
        invalid(
            select(lens.to_vec())
                .prop_flat_map(|n| broken(prefixed(LOGGING_PREFIX, ID_CHARS, n), None, NOT_ARN))
                .boxed(),
        ),
        invalid(prefixed_of(ROOM_PREFIX, ID_CHARS, &[ROOM_PREFIX.len() + 1])),
    ];
    if with_huge {
        options.push(invalid(huge(LOGGING_PREFIX, "a9é")));
    }
    proptest::strategy::Union::new(options).boxed()
}

/// TagKey: 1-128 characters, any.
fn tag_key(with_huge: bool) -> BoxedStrategy<Judged<String>> {
    let mut options = vec![
        valid(of_lengths(ANY_CHARS, &[1, 2, 127, 128])),
        valid(of_lengths("é𝄞", &[128])),
        invalid(Just(String::new()).boxed()),
        invalid(of_lengths(ANY_CHARS, &[129, 130])),
        invalid(of_lengths("é𝄞", &[129])),
    ];
    if with_huge {
        options.push(invalid(huge("", "k€")));
    }
    proptest::strategy::Union::new(options).boxed()
}

/// TagValue: 0-256 characters, any.
fn tag_value(with_huge: bool) -> BoxedStrategy<Judged<String>> {
    let mut options = vec![
        valid(of_lengths(ANY_CHARS, &[0, 1, 255, 256])),
        valid(of_lengths("é𝄞", &[256])),
        invalid(of_lengths(ANY_CHARS, &[257, 258])),
        invalid(of_lengths("é𝄞", &[257])),
    ];
    if with_huge {
        options.push(invalid(huge("", "v𝄞")));
    }
    proptest::strategy::Union::new(options).boxed()
}

/// A tag map and the violations it carries on its own (without a
/// request_id). Keys of fillers are `fN`: no generated key can equal one
/// (they have 1 or more than 126 characters, or are huge).
#[derive(Debug, Clone)]
struct Tags {
    tags: HashMap<String, String>,
    fields: BTreeSet<String>,
}

fn tags(field: &'static str) -> BoxedStrategy<Tags> {
    let fillers = |n: usize| -> HashMap<String, String> {
        (0..n).map(|i| (format!("f{i}"), format!("v{i}"))).collect()
    };
    let entry = |with_huge: bool| (tag_key(with_huge), tag_value(with_huge));
    prop_oneof![
        // Only fillers: at most 50 is fine.
        select(vec![0usize, 1, 49, 50, 51, 52]).prop_map(move |n| Tags {
            tags: fillers(n),
            fields: if n > 50 { one(field) } else { BTreeSet::new() },
        }),
        // Up to three entries at or past the limits, beside fillers.
        (
            select(vec![0usize, 47, 49, 50]),
            proptest::collection::vec(entry(false), 1..=3),
        )
            .prop_map(move |(n, entries)| judged_tags(field, fillers(n), entries)),
        // One huge key or value.
        (select(vec![0usize, 50]), entry(true)).prop_map(move |(n, entry)| judged_tags(
            field,
            fillers(n),
            vec![entry]
        )),
        // The tag a request_id takes: fine without one.
        (select(vec![0usize, 48, 49]), tag_value(false)).prop_map(move |(n, (value, ok))| {
            judged_tags(
                field,
                fillers(n),
                vec![((REQUEST_ID_TAG.to_owned(), true), (value, ok))],
            )
        }),
    ]
    .boxed()
}

/// How a refusal names a tag: `tags["key"]`, a key past TagKey's 128
/// characters by those and `…` (a refusal stays small enough for clients to
/// read: trailers are bounded).
fn tag_field(field: &str, key: &str) -> String {
    if key.chars().count() > 128 {
        let cut: String = key.chars().take(128).chain(['…']).collect();
        format!("{field}[{cut:?}]")
    } else {
        format!("{field}[{key:?}]")
    }
}

fn judged_tags(
    field: &str,
    mut tags: HashMap<String, String>,
    entries: Vec<(Judged<String>, Judged<String>)>,
) -> Tags {
    let mut bad_keys = BTreeSet::new();
    for ((key, key_ok), (value, value_ok)) in entries {
        // A later entry with the same key replaces an earlier one.
        bad_keys.remove(&key);
        if !(key_ok && value_ok) {
            bad_keys.insert(key.clone());
        }
        tags.insert(key, value);
    }
    let mut fields: BTreeSet<String> = bad_keys.iter().map(|key| tag_field(field, key)).collect();
    if tags.len() > 50 {
        fields.insert(field.to_owned());
    }
    Tags { tags, fields }
}

/// A logging list (at most 3) and its violations.
fn logging_list(field: &'static str) -> BoxedStrategy<(Vec<String>, BTreeSet<String>)> {
    let judge = move |ids: Vec<Judged<String>>| {
        let mut fields = BTreeSet::new();
        if ids.len() > 3 {
            fields.insert(field.to_owned());
        }
        for (i, (_, ok)) in ids.iter().enumerate() {
            if !ok {
                fields.insert(format!("{field}[{i}]"));
            }
        }
        (ids.into_iter().map(|(id, _)| id).collect(), fields)
    };
    prop_oneof![
        proptest::collection::vec(logging_identifier(false), 0..=5).prop_map(judge),
        logging_identifier(true).prop_map(move |id| judge(vec![id])),
    ]
    .boxed()
}

/// An integer and whether it is within `min..=max`.
fn int_in(min: i32, max: i32) -> BoxedStrategy<Judged<i32>> {
    prop_oneof![
        select(vec![min, max]).prop_map(|v| (v, true)),
        select(vec![min - 1, max + 1, -1, i32::MIN, i32::MAX]).prop_map(|v| (v, false)),
    ]
    .boxed()
}

/// An optional integer field and its violation, if any.
fn optional_int(
    field: &'static str,
    min: i32,
    max: i32,
) -> BoxedStrategy<(Option<i32>, BTreeSet<String>)> {
    prop_oneof![
        Just((None, BTreeSet::new())),
        int_in(min, max)
            .prop_map(move |(v, ok)| (Some(v), if ok { BTreeSet::new() } else { one(field) })),
    ]
    .boxed()
}

/// An enum field's value and whether it is a known one (0..=2 for both of
/// RoomService's enums in requests).
fn enum_value() -> BoxedStrategy<Judged<i32>> {
    prop_oneof![
        select(vec![0, 1, 2]).prop_map(|v| (v, true)),
        select(vec![-1, 3, 4, i32::MAX, i32::MIN]).prop_map(|v| (v, false)),
    ]
    .boxed()
}

/// A message review handler: its uri's violation (with the room's others) and
/// its fallback_result's (found while converting, on its own).
#[derive(Debug, Clone)]
struct Handler {
    handler: Option<proto::MessageReviewHandler>,
    uri: BTreeSet<String>,
    fallback: BTreeSet<String>,
}

fn handler() -> BoxedStrategy<Handler> {
    prop_oneof![
        1 => Just(Handler {
            handler: None,
            uri: BTreeSet::new(),
            fallback: BTreeSet::new(),
        }),
        3 => (lambda_arn(), enum_value()).prop_map(|((uri, uri_ok), (fallback, fallback_ok))| {
            Handler {
                handler: Some(proto::MessageReviewHandler {
                    uri,
                    fallback_result: fallback,
                }),
                uri: if uri_ok {
                    BTreeSet::new()
                } else {
                    one("message_review_handler.uri")
                },
                fallback: if fallback_ok {
                    BTreeSet::new()
                } else {
                    one("message_review_handler.fallback_result")
                },
            }
        }),
    ]
    .boxed()
}

/// request_id: empty (unset), or 1-128 characters of `[a-zA-Z0-9._:-]`.
fn request_id() -> BoxedStrategy<Judged<String>> {
    prop_oneof![
        2 => Just((String::new(), true)),
        1 => valid(of_lengths(REQUEST_ID_CHARS, &[1, 2, 127, 128])),
        1 => invalid(of_lengths(REQUEST_ID_CHARS, &[129, 130])),
        1 => invalid(
            (1usize..=128)
                .prop_flat_map(|n| broken(cycled(REQUEST_ID_CHARS, n), None, NOT_REQUEST_ID))
                .boxed()
        ),
        1 => invalid(huge("", "a.é")),
    ]
    .boxed()
}

/// A region to send a request to: empty (the default), the one the harness
/// serves, or one it does not serve (another region, not a region name).
fn region() -> BoxedStrategy<Judged<String>> {
    prop_oneof![
        2 => Just((String::new(), true)),
        1 => Just(("us-east-1".to_owned(), true)),
        1 => select(vec!["eu-west-1", "US-EAST-1", "mars", " us-east-1"])
            .prop_map(|r| (r.to_owned(), false)),
    ]
    .boxed()
}

fn fields_of(judged: &Judged<String>, field: &str) -> BTreeSet<String> {
    if judged.1 {
        BTreeSet::new()
    } else {
        one(field)
    }
}

// ---------------------------------------------------------------------------
// One test per request message.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room() {
    let h = Harness::start().await;
    let strategy = (
        room_name(),
        optional_int("maximum_message_rate_per_second", 1, 100),
        optional_int("maximum_message_length", 1, 500),
        handler(),
        tags("tags"),
        logging_list("logging_configuration_identifiers"),
        request_id(),
        region(),
    )
        .prop_filter_map(
            "a valid request",
            |(name, rate, length, handler, tags, logging, request_id, region)| {
                let room: BTreeSet<String> = [
                    fields_of(&name, "name"),
                    rate.1,
                    length.1,
                    handler.uri,
                    tags.fields,
                    logging.1,
                ]
                .into_iter()
                .flatten()
                .collect();
                // With a request_id: its own rule, and room for its tag.
                let mut with_id = BTreeSet::new();
                if !request_id.0.is_empty() {
                    with_id.extend(fields_of(&request_id, "request_id"));
                    if tags.tags.contains_key(REQUEST_ID_TAG) {
                        with_id.insert(format!("tags[{REQUEST_ID_TAG:?}]"));
                    } else if tags.tags.len() >= 50 {
                        with_id.insert("tags".to_owned());
                    }
                }
                // The region is looked at first: where the call would go.
                let expect = Expect::groups([
                    fields_of(&region, "region"),
                    handler.fallback,
                    room,
                    with_id,
                ])?;
                let request = proto::CreateRoomRequest {
                    region: region.0,
                    name: name.0,
                    maximum_message_rate_per_second: rate.0,
                    maximum_message_length: length.0,
                    message_review_handler: handler.handler,
                    tags: tags.tags,
                    logging_configuration_identifiers: logging.0,
                    request_id: request_id.0,
                };
                Some((request, expect))
            },
        );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().create_room(request).await, &expect)
            .await
    });
    let oversize = proto::CreateRoomRequest {
        name: "n".repeat(MAX_REQUEST_SIZE + 1),
        ..Default::default()
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().create_room(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("CreateRoom", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_room() {
    let h = Harness::start().await;
    let strategy = (room_identifier(h.room.arn.clone()), enum_value()).prop_filter_map(
        "a valid request",
        |(identifier, consistency)| {
            let expect = Expect::groups([
                fields_of(&identifier, "identifier"),
                if consistency.1 {
                    BTreeSet::new()
                } else {
                    one("consistency")
                },
            ])?;
            let request = proto::GetRoomRequest {
                identifier: identifier.0,
                consistency: consistency.0,
            };
            Some((request, expect))
        },
    );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().get_room(request).await, &expect)
            .await
    });
    let oversize = proto::GetRoomRequest {
        identifier: format!("{}{}", h.room.arn, "x".repeat(MAX_REQUEST_SIZE)),
        consistency: 0,
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().get_room(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("GetRoom", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_room() {
    let h = Harness::start().await;
    let optional_name = prop_oneof![Just(None), room_name().prop_map(Some)];
    let logging = prop_oneof![
        Just((None, BTreeSet::new())),
        logging_list("logging_configuration_identifiers").prop_map(|(ids, fields)| (
            Some(proto::LoggingConfigurationIdentifiers { identifiers: ids }),
            fields
        )),
    ];
    let strategy = (
        room_identifier(h.room.arn.clone()),
        optional_name,
        optional_int("maximum_message_rate_per_second", 1, 100),
        optional_int("maximum_message_length", 1, 500),
        handler(),
        logging,
    )
        .prop_filter_map(
            "a valid request",
            |(identifier, name, rate, length, handler, logging)| {
                let patch: BTreeSet<String> = [
                    name.as_ref()
                        .map(|n| fields_of(n, "name"))
                        .unwrap_or_default(),
                    rate.1,
                    length.1,
                    handler.uri,
                    logging.1,
                ]
                .into_iter()
                .flatten()
                .collect();
                let expect = Expect::groups([
                    handler.fallback,
                    fields_of(&identifier, "identifier"),
                    patch,
                ])?;
                let request = proto::UpdateRoomRequest {
                    identifier: identifier.0,
                    name: name.map(|n| n.0),
                    maximum_message_rate_per_second: rate.0,
                    maximum_message_length: length.0,
                    message_review_handler: handler.handler,
                    logging_configuration_identifiers: logging.0,
                    expected_update_time: None,
                };
                Some((request, expect))
            },
        );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().update_room(request).await, &expect)
            .await
    });
    let oversize = proto::UpdateRoomRequest {
        identifier: h.room.arn.clone(),
        name: Some("n".repeat(MAX_REQUEST_SIZE)),
        ..Default::default()
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().update_room(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("UpdateRoom", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_room() {
    let h = Harness::start().await;
    let strategy = bad_room_arn().prop_map(|identifier| {
        let request = proto::DeleteRoomRequest {
            identifier,
            expected_update_time: None,
        };
        (request, Expect::Invalid(vec![one("identifier")]))
    });
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().delete_room(request).await, &expect)
            .await
    });
    let oversize = proto::DeleteRoomRequest {
        identifier: format!("{}{}", h.room.arn, "x".repeat(MAX_REQUEST_SIZE)),
        expected_update_time: None,
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().delete_room(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("DeleteRoom", 1).await;
}

/// A next_token this service did not issue, as long as the model allows (up
/// to 1,024 characters) or longer.
fn next_token() -> BoxedStrategy<(String, BTreeSet<String>, BTreeSet<String>)> {
    // '!' and the like are outside base64's alphabet: never a token.
    const NOT_BASE64: &str = "!@#é𝄞 ";
    prop_oneof![
        Just((String::new(), BTreeSet::new(), BTreeSet::new())),
        // Within the model's length: refused when decoded.
        of_lengths(NOT_BASE64, &[1, 1023, 1024]).prop_map(|t| (
            t,
            BTreeSet::new(),
            one("next_token")
        )),
        // Base64 of something that is not `nanos:key`.
        select(vec![
            "bm9jb2xvbg",
            "YWJjOmRlZg",
            "OTk5OTk5OTk5OTk5OTk5OTk5OTk6aw"
        ])
        .prop_map(|t| (t.to_owned(), BTreeSet::new(), one("next_token"))),
        // Past the model's length.
        of_lengths(NOT_BASE64, &[1025]).prop_map(|t| (t, one("next_token"), one("next_token"))),
        huge("", "Aé").prop_map(|t| (t, one("next_token"), one("next_token"))),
    ]
    .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_rooms() {
    let h = Harness::start().await;
    // Empty filters are no filters.
    let optional = |s: BoxedStrategy<Judged<String>>| {
        prop_oneof![1 => Just((String::new(), true)), 2 => s].boxed()
    };
    // 0 is the default; -1 and 51 are past the limits.
    let max_results = prop_oneof![
        select(vec![0, 1, 50]).prop_map(|v| (v, true)),
        select(vec![-1, 51, i32::MIN, i32::MAX]).prop_map(|v| (v, false)),
    ];
    let strategy = (
        optional(room_name()),
        optional(lambda_arn()),
        optional(
            logging_identifier(true)
                .prop_map(|(id, ok)| {
                    let ok = ok || id.is_empty();
                    (id, ok)
                })
                .boxed(),
        ),
        max_results,
        next_token(),
        region(),
    )
        .prop_filter_map(
            "a valid request",
            |(name, uri, logging, max_results, (token, token_field, token_decoded), region)| {
                let mut checked: BTreeSet<String> = [
                    fields_of(&name, "name"),
                    fields_of(&uri, "message_review_handler_uri"),
                    fields_of(&logging, "logging_configuration_identifier"),
                ]
                .into_iter()
                .flatten()
                .collect();
                if !max_results.1 {
                    checked.insert("max_results".into());
                }
                checked.extend(token_field);
                let expect =
                    Expect::groups([fields_of(&region, "region"), checked, token_decoded])?;
                let request = proto::ListRoomsRequest {
                    region: region.0,
                    name: name.0,
                    message_review_handler_uri: uri.0,
                    logging_configuration_identifier: logging.0,
                    max_results: max_results.0,
                    next_token: token,
                };
                Some((request, expect))
            },
        );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().list_rooms(request).await, &expect)
            .await
    });
    let oversize = proto::ListRoomsRequest {
        next_token: "t".repeat(MAX_REQUEST_SIZE + 1),
        ..Default::default()
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().list_rooms(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("ListRooms", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_room() {
    let h = Harness::start().await;
    let strategy = (room_identifier(h.room.arn.clone()), tags("tags")).prop_filter_map(
        "a valid request",
        |(identifier, tags)| {
            let expect = Expect::groups([fields_of(&identifier, "identifier"), tags.fields])?;
            let request = proto::TagRoomRequest {
                identifier: identifier.0,
                tags: tags.tags,
            };
            Some((request, expect))
        },
    );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().tag_room(request).await, &expect)
            .await
    });
    let oversize = proto::TagRoomRequest {
        identifier: h.room.arn.clone(),
        tags: HashMap::from([("k".into(), "v".repeat(MAX_REQUEST_SIZE))]),
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().tag_room(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("TagRoom", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untag_room() {
    let h = Harness::start().await;
    // 0-52 keys (an empty list is a missing one), some of them past the limits.
    let keys = (
        select(vec![0usize, 1, 2, 49, 50, 51, 52]),
        proptest::collection::vec((any::<Index>(), tag_key(false)), 0..=3),
        prop::option::of((any::<Index>(), tag_key(true))),
    )
        .prop_map(|(n, replaced, huge)| {
            let mut keys: Vec<(String, bool)> = (0..n).map(|i| (format!("f{i}"), true)).collect();
            if !keys.is_empty() {
                for (at, key) in replaced.into_iter().chain(huge) {
                    let i = at.index(keys.len());
                    keys[i] = key;
                }
            }
            let mut fields = BTreeSet::new();
            if keys.is_empty() || keys.len() > 50 {
                fields.insert("tag_keys".to_owned());
            }
            for (i, (_, ok)) in keys.iter().enumerate() {
                if !ok {
                    fields.insert(format!("tag_keys[{i}]"));
                }
            }
            (keys.into_iter().map(|(k, _)| k).collect::<Vec<_>>(), fields)
        });
    let strategy = (room_identifier(h.room.arn.clone()), keys).prop_filter_map(
        "a valid request",
        |(identifier, (tag_keys, fields))| {
            let expect = Expect::groups([fields_of(&identifier, "identifier"), fields])?;
            let request = proto::UntagRoomRequest {
                identifier: identifier.0,
                tag_keys,
            };
            Some((request, expect))
        },
    );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().untag_room(request).await, &expect)
            .await
    });
    let oversize = proto::UntagRoomRequest {
        identifier: h.room.arn.clone(),
        tag_keys: vec!["k".repeat(MAX_REQUEST_SIZE)],
    };
    let size = oversize.encoded_len();
    h.check(
        size,
        h.client().untag_room(oversize).await,
        &Expect::OutOfRange(None),
    )
    .await
    .expect("oversize");
    h.finish("UntagRoom", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rooms() {
    let h = Harness::start().await;
    let newest = h.before.revision;
    let identifiers = prop_oneof![
        proptest::collection::vec(room_identifier(h.room.arn.clone()), 0..=4),
        proptest::collection::vec(bad_room_arn().prop_map(|s| (s, false)), 1..=2),
    ];
    let after_revision = prop_oneof![
        Just(None),
        select(vec![
            0,
            newest,
            newest + 1,
            newest + 1000,
            i64::MAX as u64 + 1,
            u64::MAX
        ])
        .prop_map(Some),
    ];
    // Served, or not: none, the one served, one of another region, an empty name.
    let regions = prop_oneof![
        Just(vec![]),
        Just(vec![("us-east-1".to_owned(), true)]),
        Just(vec![
            ("us-east-1".to_owned(), true),
            ("eu-west-1".to_owned(), false)
        ]),
        Just(vec![(String::new(), false)]),
    ];
    let strategy = (identifiers, after_revision, any::<bool>(), regions).prop_filter_map(
        "a valid request",
        move |(identifiers, after_revision, include_snapshot, regions)| {
            // Malformed identifiers are refused first; then identifiers and
            // regions not served, together.
            let elsewhere = |s: &str| s.starts_with("arn:aws:ivschat:eu-west-1:");
            let ids: BTreeSet<String> = identifiers
                .iter()
                .enumerate()
                .filter(|(_, (s, ok))| !ok && !elsewhere(s))
                .map(|(i, _)| format!("identifiers[{i}]"))
                .collect();
            let unserved: BTreeSet<String> = identifiers
                .iter()
                .enumerate()
                .filter(|(_, (s, ok))| !ok && elsewhere(s))
                .map(|(i, _)| format!("identifiers[{i}]"))
                .chain(
                    regions
                        .iter()
                        .enumerate()
                        .filter(|(_, (_, ok))| !ok)
                        .map(|(i, _)| format!("regions[{i}]")),
                )
                .collect();
            let snapshot = if include_snapshot && after_revision.is_some() {
                one("include_snapshot")
            } else {
                BTreeSet::new()
            };
            let expect = match Expect::groups([ids, unserved, snapshot]) {
                Some(expect) => expect,
                None if after_revision.is_some_and(|a| a > newest) => {
                    Expect::OutOfRange(Some("REVISION_OUT_OF_RANGE"))
                }
                None => return None,
            };
            let request = proto::WatchRoomsRequest {
                identifiers: identifiers.into_iter().map(|(s, _)| s).collect(),
                after_revision,
                include_snapshot,
                regions: regions.into_iter().map(|(r, _)| r).collect(),
            };
            Some((request, expect))
        },
    );
    h.run(CASES, strategy, async |(request, expect)| {
        let size = request.encoded_len();
        let answer = h.client().watch_rooms(request).await.map(|_| "a stream");
        h.check(size, answer, &expect).await
    });
    let oversize = proto::WatchRoomsRequest {
        identifiers: vec!["x".repeat(MAX_REQUEST_SIZE)],
        ..Default::default()
    };
    let size = oversize.encoded_len();
    let answer = h.client().watch_rooms(oversize).await.map(|_| "a stream");
    h.check(size, answer, &Expect::OutOfRange(None))
        .await
        .expect("oversize");
    h.finish("WatchRooms", 1).await;
}

// ---------------------------------------------------------------------------
// expected_update_time (UpdateRoom, DeleteRoom): a google.protobuf.Timestamp
// within 0001-01-01T00:00:00Z..=9999-12-31T23:59:59.999999999Z, nanos
// within 0..=999,999,999.

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z in seconds since the epoch.
const MIN_SECONDS: i64 = -62_135_596_800;
const MAX_SECONDS: i64 = 253_402_300_799;

fn timestamp() -> BoxedStrategy<Judged<prost_types::Timestamp>> {
    let ts = |(seconds, nanos)| prost_types::Timestamp { seconds, nanos };
    let good_seconds = select(vec![MIN_SECONDS, -1, 0, 1_700_000_000, MAX_SECONDS]);
    let good_nanos = select(vec![0, 1, 999_999_999]);
    prop_oneof![
        (good_seconds.clone(), good_nanos.clone()).prop_map(move |t| (ts(t), true)),
        (
            good_seconds,
            select(vec![-1, 1_000_000_000, i32::MIN, i32::MAX])
        )
            .prop_map(move |t| (ts(t), false)),
        (
            select(vec![MIN_SECONDS - 1, MAX_SECONDS + 1, i64::MIN, i64::MAX]),
            good_nanos
        )
            .prop_map(move |t| (ts(t), false)),
    ]
    .boxed()
}

/// Refused with INVALID_ARGUMENT naming `expected_update_time` when out of
/// range (alone or beside other violations); at the limits, accepted as far
/// as that field goes (the request is refused for its other violation only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_update_time() {
    let h = Harness::start().await;
    let field = || one("expected_update_time");
    let update = (
        timestamp(),
        room_identifier(h.room.arn.clone()),
        prop_oneof![Just(None), room_name().prop_map(Some)],
    )
        .prop_filter_map("a valid request", |(time, identifier, name)| {
            let expect = Expect::groups([
                if time.1 { BTreeSet::new() } else { field() },
                fields_of(&identifier, "identifier"),
                name.as_ref()
                    .map(|n| fields_of(n, "name"))
                    .unwrap_or_default(),
            ])?;
            let request = proto::UpdateRoomRequest {
                identifier: identifier.0,
                name: name.map(|n| n.0),
                expected_update_time: Some(time.0),
                ..Default::default()
            };
            Some((request, expect))
        });
    h.run(CASES, update, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().update_room(request).await, &expect)
            .await
    });
    let delete = (
        timestamp(),
        prop_oneof![
            Just((h.room.arn.clone(), true)),
            bad_room_arn().prop_map(|s| (s, false))
        ],
    )
        .prop_filter_map("a valid request", |(time, identifier)| {
            let expect = Expect::groups([
                if time.1 { BTreeSet::new() } else { field() },
                fields_of(&identifier, "identifier"),
            ])?;
            let request = proto::DeleteRoomRequest {
                identifier: identifier.0,
                expected_update_time: Some(time.0),
            };
            Some((request, expect))
        });
    h.run(CASES, delete, async |(request, expect)| {
        let size = request.encoded_len();
        h.check(size, h.client().delete_room(request).await, &expect)
            .await
    });
    h.finish("expected_update_time", 1).await;
}

// ---------------------------------------------------------------------------
// Invalid UTF-8 and malformed protobuf, hand-encoded, through a codec over
// raw bytes.

/// A codec that sends and receives message bodies as they are.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Sends `body` as the request message of `method`; a server-streaming
/// method's answer is its first message.
async fn raw_call(
    channel: tonic::transport::Channel,
    method: &str,
    body: Vec<u8>,
) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    let path = PathAndQuery::try_from(format!("{SERVICE}{method}")).expect("a path");
    let request = tonic::Request::new(Bytes::from(body));
    if method == "WatchRooms" {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        Ok(stream.message().await?.unwrap_or_default())
    } else {
        Ok(grpc.unary(request, path, RawCodec).await?.into_inner())
    }
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited field (wire type 2).
fn len_field(number: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 8);
    varint((u64::from(number) << 3) | 2, &mut out);
    varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// Where a string goes in a request, and the field the server must name.
#[derive(Debug, Clone, Copy)]
struct Slot {
    method: &'static str,
    /// Field numbers from the request down to the string (a map entry's key
    /// is 1, its value 2).
    path: &'static [u32],
    field: &'static str,
}

const SLOTS: &[Slot] = &[
    Slot {
        method: "CreateRoom",
        path: &[1],
        field: "name",
    },
    Slot {
        method: "CreateRoom",
        path: &[4, 1],
        field: "message_review_handler.uri",
    },
    Slot {
        method: "CreateRoom",
        path: &[5, 1],
        field: "tags",
    },
    Slot {
        method: "CreateRoom",
        path: &[5, 2],
        field: "tags",
    },
    Slot {
        method: "CreateRoom",
        path: &[6],
        field: "logging_configuration_identifiers",
    },
    Slot {
        method: "CreateRoom",
        path: &[7],
        field: "request_id",
    },
    Slot {
        method: "GetRoom",
        path: &[1],
        field: "identifier",
    },
    Slot {
        method: "UpdateRoom",
        path: &[1],
        field: "identifier",
    },
    Slot {
        method: "UpdateRoom",
        path: &[2],
        field: "name",
    },
    Slot {
        method: "UpdateRoom",
        path: &[5, 1],
        field: "message_review_handler.uri",
    },
    Slot {
        method: "UpdateRoom",
        path: &[6, 1],
        field: "logging_configuration_identifiers.identifiers",
    },
    Slot {
        method: "DeleteRoom",
        path: &[1],
        field: "identifier",
    },
    Slot {
        method: "ListRooms",
        path: &[1],
        field: "name",
    },
    Slot {
        method: "ListRooms",
        path: &[2],
        field: "message_review_handler_uri",
    },
    Slot {
        method: "ListRooms",
        path: &[3],
        field: "logging_configuration_identifier",
    },
    Slot {
        method: "ListRooms",
        path: &[5],
        field: "next_token",
    },
    Slot {
        method: "TagRoom",
        path: &[1],
        field: "identifier",
    },
    Slot {
        method: "TagRoom",
        path: &[2, 1],
        field: "tags",
    },
    Slot {
        method: "TagRoom",
        path: &[2, 2],
        field: "tags",
    },
    Slot {
        method: "UntagRoom",
        path: &[1],
        field: "identifier",
    },
    Slot {
        method: "UntagRoom",
        path: &[2],
        field: "tag_keys",
    },
    Slot {
        method: "WatchRooms",
        path: &[1],
        field: "identifiers",
    },
];

/// Every method, with its field number 1 (a string in every request).
const FIRST_FIELDS: &[(&str, &str)] = &[
    ("CreateRoom", "name"),
    ("GetRoom", "identifier"),
    ("UpdateRoom", "identifier"),
    ("DeleteRoom", "identifier"),
    ("ListRooms", "name"),
    ("TagRoom", "identifier"),
    ("UntagRoom", "identifier"),
    ("WatchRooms", "identifiers"),
];

/// Byte sequences that are not UTF-8: lone continuation bytes, truncated
/// sequences, overlong encodings, surrogates, past U+10FFFF, 0xFE/0xFF.
const NOT_UTF8: &[&[u8]] = &[
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xbf",
    b"\xc3",
    b"\xc3\x28",
    b"\xe2\x82",
    b"\xe2\x28\xa1",
    b"\xf0\x9d\x84",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
];

/// Valid text around the bad bytes.
const AROUND: &[&str] = &[
    "",
    "a",
    "arn:aws:ivschat:us-east-1:123456789012:room/",
    "é𝄞",
    "k",
];

#[derive(Debug, Clone)]
struct RawCase {
    method: &'static str,
    body: Vec<u8>,
    expect: Expect,
}

fn utf8_case() -> impl Strategy<Value = RawCase> {
    (
        select(SLOTS),
        select(NOT_UTF8),
        select(AROUND),
        select(AROUND),
        0usize..3,
    )
        .prop_map(|(slot, bad, before, after, repeat)| {
            let mut text = before.as_bytes().to_vec();
            for _ in 0..=repeat {
                text.extend_from_slice(bad);
            }
            text.extend_from_slice(after.as_bytes());
            let mut body = text;
            for number in slot.path.iter().rev() {
                body = len_field(*number, &body);
            }
            RawCase {
                method: slot.method,
                body,
                expect: Expect::Invalid(vec![one(slot.field)]),
            }
        })
}

/// Malformed protobuf other than text: a length past the end, a string sent
/// as a varint, wire types 6 and 7, field number 0, a truncated varint.
fn malformed_case() -> impl Strategy<Value = RawCase> {
    (select(FIRST_FIELDS), 0usize..6).prop_map(|((method, field), kind)| {
        let (body, expect) = match kind {
            0 => (
                vec![0x0a, 10, b'a', b'b', b'c'],
                Expect::Invalid(vec![one(field)]),
            ),
            1 => (vec![0x08, 0x01], Expect::Invalid(vec![one(field)])),
            2 => (vec![0x0e, 0x01], Expect::InvalidNoField),
            3 => (vec![0x0f, 0x01], Expect::InvalidNoField),
            4 => (vec![0x02, 0x00], Expect::InvalidNoField),
            _ => (vec![0x78, 0x80], Expect::InvalidNoField),
        };
        RawCase {
            method,
            body,
            expect,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_malformed_protobuf() {
    let h = Harness::start().await;
    let channel = h.server.channel().await;
    // The raw path itself works: a valid GetRoom, hand-encoded, is served.
    let get = len_field(1, h.room.arn.as_bytes());
    let answer = raw_call(channel.clone(), "GetRoom", get)
        .await
        .expect("a hand-encoded GetRoom is served");
    assert_eq!(proto::Room::decode(answer).expect("a Room"), h.room);

    let strategy = prop_oneof![3 => utf8_case(), 1 => malformed_case()];
    h.run(2 * CASES, strategy, async |case| {
        let answer = raw_call(channel.clone(), case.method, case.body.clone()).await;
        h.check(case.body.len(), answer, &case.expect)
            .await
            .map_err(|e| format!("{}: {e}", case.method))
    });
    h.finish("invalid UTF-8 and malformed protobuf", 0).await;
}
