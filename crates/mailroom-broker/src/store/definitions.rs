//! Broker definitions (vhosts, users, exchanges, durable queues, bindings) and their encoding.
//!
//! The broker now keeps them in an append-only log ([`super::definitions_log`]); this module keeps the
//! previous format, a snapshot file read once to upgrade a data directory written by an older version.
//! That file was small and rewritten whole on every change: write `definitions.tmp`, fsync it,
//! rename it over `definitions.bin`, fsync the directory. A crash leaves either the old or the new
//! file, never a mix. Layout: magic `MRDEFS01` (8 bytes), payload length (u64), CRC32 of the payload
//! (u32), payload. Argument tables use a small self-describing encoding that keeps every AMQP field
//! type exactly (JSON would lose float NaNs, byte arrays versus strings, and integer widths).

use super::{StoreError, StoreResult};
use amq_protocol_types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the definitions file in the data directory.
pub const FILE_NAME: &str = "definitions.bin";
const TMP_NAME: &str = "definitions.tmp";
const MAGIC: &[u8; 8] = b"MRDEFS01";
/// Deepest nesting of tables/arrays accepted when loading (matches the codec's guard).
const MAX_DEPTH: usize = 16;

/// A virtual host.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VhostDef {
    /// Its name.
    pub name: String,
}

/// A user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UserDef {
    /// User name.
    pub name: String,
    /// Password (as the broker keeps it; hashing is the broker's concern).
    pub password: String,
    /// Whether the user may only connect from loopback (like RabbitMQ's guest).
    pub loopback_only: bool,
    /// Management tags (e.g. `administrator`).
    pub tags: Vec<String>,
}

/// A durable exchange.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExchangeDef {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// Type name as declared (`direct`, `topic`, `x-delayed-message`, ...).
    pub kind: String,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Internal flag.
    pub internal: bool,
    /// Declaration arguments, kept exactly.
    pub arguments: FieldTable,
    /// Which incarnation of the name this is: names its store directory, so a deleted exchange's files
    /// are never a re-declared one's (0 = the directory of files written before generations existed).
    pub generation: u64,
}

/// A durable, non-exclusive queue.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QueueDef {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Declaration arguments (`x-message-ttl`, `x-dead-letter-exchange`, ...), kept exactly.
    pub arguments: FieldTable,
    /// Which incarnation of the name this is: names its segment directory, so a deleted queue's files are
    /// never a re-declared one's (0 = the directory of files written before generations existed).
    pub generation: u64,
}

/// What a binding points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DestinationKind {
    /// A queue.
    #[default]
    Queue,
    /// An exchange (exchange-to-exchange binding).
    Exchange,
}

/// A binding between durable resources.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BindingDef {
    /// Its vhost.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange name.
    pub destination: String,
    /// Whether the destination is a queue or an exchange.
    pub destination_kind: DestinationKind,
    /// Routing key.
    pub routing_key: String,
    /// Binding arguments (headers-exchange match rules), kept exactly.
    pub arguments: FieldTable,
}

/// A policy. Saved in a trailing section: files written before policies existed end without it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyDef {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// The name pattern (a regular expression).
    pub pattern: String,
    /// `queues`, `exchanges` or `all`.
    pub apply_to: String,
    /// Highest wins.
    pub priority: i64,
    /// The definition, kept exactly.
    pub definition: FieldTable,
}

/// Everything that must survive a restart besides messages.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Definitions {
    /// Virtual hosts.
    pub vhosts: Vec<VhostDef>,
    /// Users.
    pub users: Vec<UserDef>,
    /// Durable exchanges.
    pub exchanges: Vec<ExchangeDef>,
    /// Durable, non-exclusive queues.
    pub queues: Vec<QueueDef>,
    /// Bindings whose source and destination are durable.
    pub bindings: Vec<BindingDef>,
    /// Policies.
    pub policies: Vec<PolicyDef>,
}

impl Definitions {
    /// Writes the definitions to `dir` atomically and durably (temp file, fsync, rename, fsync dir).
    pub fn save(&self, dir: &Path) -> StoreResult<()> {
        let payload = self.encode();
        let mut file_bytes = Vec::with_capacity(payload.len() + 20);
        file_bytes.extend_from_slice(MAGIC);
        file_bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file_bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        file_bytes.extend_from_slice(&payload);
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io("creating", dir, e))?;
        let tmp = dir.join(TMP_NAME);
        let dst = dir.join(FILE_NAME);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&file_bytes)?;
            f.sync_all()
        };
        write().map_err(|e| StoreError::io("writing", &tmp, e))?;
        std::fs::rename(&tmp, &dst).map_err(|e| StoreError::io("renaming", &dst, e))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io("fsyncing directory", dir, e))
    }

    /// Loads the definitions from `dir`; `Ok(None)` if there are none yet (first start).
    pub fn load(dir: &Path) -> StoreResult<Option<Definitions>> {
        let path = dir.join(FILE_NAME);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("reading", &path, e)),
        };
        let bad = |reason: &str| StoreError::BadDefinitions { path: path.clone(), reason: reason.to_owned() };
        if data.len() < 20 || &data[..8] != MAGIC {
            return Err(bad("bad magic or version"));
        }
        let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(data[16..20].try_into().expect("4 bytes"));
        let payload = &data[20..];
        if payload.len() as u64 != len {
            return Err(bad("length mismatch"));
        }
        if crc32fast::hash(payload) != crc {
            return Err(bad("CRC mismatch"));
        }
        Definitions::decode(payload).map(Some).map_err(bad)
    }

    /// The payload encoding (without the file header).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        put_u32(&mut w, self.vhosts.len());
        for v in &self.vhosts {
            put_str(&mut w, &v.name);
        }
        put_u32(&mut w, self.users.len());
        for u in &self.users {
            put_str(&mut w, &u.name);
            put_str(&mut w, &u.password);
            w.push(u.loopback_only as u8);
            put_u32(&mut w, u.tags.len());
            for t in &u.tags {
                put_str(&mut w, t);
            }
        }
        put_u32(&mut w, self.exchanges.len());
        for e in &self.exchanges {
            put_str(&mut w, &e.vhost);
            put_str(&mut w, &e.name);
            put_str(&mut w, &e.kind);
            w.push(e.auto_delete as u8 | (e.internal as u8) << 1);
            put_table(&mut w, &e.arguments);
        }
        put_u32(&mut w, self.queues.len());
        for q in &self.queues {
            put_str(&mut w, &q.vhost);
            put_str(&mut w, &q.name);
            w.push(q.auto_delete as u8);
            put_table(&mut w, &q.arguments);
        }
        put_u32(&mut w, self.bindings.len());
        for b in &self.bindings {
            put_str(&mut w, &b.vhost);
            put_str(&mut w, &b.source);
            put_str(&mut w, &b.destination);
            w.push(match b.destination_kind {
                DestinationKind::Queue => 0,
                DestinationKind::Exchange => 1,
            });
            put_str(&mut w, &b.routing_key);
            put_table(&mut w, &b.arguments);
        }
        // Trailing section, absent from older files.
        if !self.policies.is_empty() {
            put_u32(&mut w, self.policies.len());
            for p in &self.policies {
                put_str(&mut w, &p.vhost);
                put_str(&mut w, &p.name);
                put_str(&mut w, &p.pattern);
                put_str(&mut w, &p.apply_to);
                w.extend_from_slice(&p.priority.to_be_bytes());
                put_table(&mut w, &p.definition);
            }
        }
        w
    }

    /// Decodes a payload. Never panics on any input.
    pub fn decode(buf: &[u8]) -> Result<Definitions, &'static str> {
        let mut r = Reader { buf, pos: 0 };
        let mut d = Definitions::default();
        for _ in 0..r.count()? {
            d.vhosts.push(VhostDef { name: r.str()? });
        }
        for _ in 0..r.count()? {
            let name = r.str()?;
            let password = r.str()?;
            let loopback_only = r.u8()? != 0;
            let mut tags = Vec::new();
            for _ in 0..r.count()? {
                tags.push(r.str()?);
            }
            d.users.push(UserDef { name, password, loopback_only, tags });
        }
        for _ in 0..r.count()? {
            let (vhost, name, kind) = (r.str()?, r.str()?, r.str()?);
            let flags = r.u8()?;
            let arguments = r.table(0)?;
            d.exchanges.push(ExchangeDef {
                vhost,
                name,
                kind,
                auto_delete: flags & 1 != 0,
                internal: flags & 2 != 0,
                arguments,
                generation: 0,
            });
        }
        for _ in 0..r.count()? {
            let (vhost, name) = (r.str()?, r.str()?);
            let auto_delete = r.u8()? != 0;
            let arguments = r.table(0)?;
            d.queues.push(QueueDef { vhost, name, auto_delete, arguments, generation: 0 });
        }
        for _ in 0..r.count()? {
            let (vhost, source, destination) = (r.str()?, r.str()?, r.str()?);
            let destination_kind = match r.u8()? {
                0 => DestinationKind::Queue,
                1 => DestinationKind::Exchange,
                _ => return Err("bad destination kind"),
            };
            let routing_key = r.str()?;
            let arguments = r.table(0)?;
            d.bindings.push(BindingDef { vhost, source, destination, destination_kind, routing_key, arguments });
        }
        if r.pos < buf.len() {
            for _ in 0..r.count()? {
                let (vhost, name, pattern, apply_to) = (r.str()?, r.str()?, r.str()?, r.str()?);
                let priority = i64::from_be_bytes(r.arr::<8>()?);
                let definition = r.table(0)?;
                d.policies.push(PolicyDef { vhost, name, pattern, apply_to, priority, definition });
            }
        }
        if r.pos != buf.len() {
            return Err("trailing bytes");
        }
        Ok(d)
    }

    /// Where [`Definitions::save`] puts the file in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }
}

pub(crate) fn put_u32(w: &mut Vec<u8>, n: usize) {
    w.extend_from_slice(&(n as u32).to_le_bytes());
}

pub(crate) fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_u32(w, b.len());
    w.extend_from_slice(b);
}

pub(crate) fn put_str(w: &mut Vec<u8>, s: &str) {
    put_bytes(w, s.as_bytes());
}

pub(crate) fn put_table(w: &mut Vec<u8>, t: &FieldTable) {
    put_u32(w, t.inner().len());
    for (k, v) in t.inner() {
        put_str(w, k.as_str());
        put_value(w, v);
    }
}

// Tags are the AMQP 0-9-1/RabbitMQ field type letters, so a dump is readable next to the spec.
fn put_value(w: &mut Vec<u8>, v: &AMQPValue) {
    match v {
        AMQPValue::Boolean(b) => w.extend_from_slice(&[b't', *b as u8]),
        AMQPValue::ShortShortInt(n) => w.extend_from_slice(&[b'b', *n as u8]),
        AMQPValue::ShortShortUInt(n) => w.extend_from_slice(&[b'B', *n]),
        AMQPValue::ShortInt(n) => {
            w.push(b's');
            w.extend_from_slice(&n.to_le_bytes())
        }
        AMQPValue::ShortUInt(n) => {
            w.push(b'u');
            w.extend_from_slice(&n.to_le_bytes())
        }
        AMQPValue::LongInt(n) => {
            w.push(b'I');
            w.extend_from_slice(&n.to_le_bytes())
        }
        AMQPValue::LongUInt(n) => {
            w.push(b'i');
            w.extend_from_slice(&n.to_le_bytes())
        }
        AMQPValue::LongLongInt(n) => {
            w.push(b'l');
            w.extend_from_slice(&n.to_le_bytes())
        }
        AMQPValue::Float(f) => {
            w.push(b'f');
            w.extend_from_slice(&f.to_bits().to_le_bytes())
        }
        AMQPValue::Double(f) => {
            w.push(b'd');
            w.extend_from_slice(&f.to_bits().to_le_bytes())
        }
        AMQPValue::DecimalValue(d) => {
            w.extend_from_slice(&[b'D', d.scale]);
            w.extend_from_slice(&d.value.to_le_bytes())
        }
        AMQPValue::ShortString(s) => {
            // No wire letter exists ('s' is RabbitMQ's short int); '_' is amq-protocol's internal id.
            w.push(b'_');
            put_str(w, s.as_str())
        }
        AMQPValue::LongString(s) => {
            w.push(b'S');
            put_bytes(w, s.as_bytes())
        }
        AMQPValue::FieldArray(a) => {
            w.push(b'A');
            put_u32(w, a.as_slice().len());
            for v in a.as_slice() {
                put_value(w, v);
            }
        }
        AMQPValue::Timestamp(t) => {
            w.push(b'T');
            w.extend_from_slice(&t.to_le_bytes())
        }
        AMQPValue::FieldTable(t) => {
            w.push(b'F');
            put_table(w, t)
        }
        AMQPValue::ByteArray(b) => {
            w.push(b'x');
            put_bytes(w, b.as_slice())
        }
        AMQPValue::Void => w.push(b'V'),
    }
}

/// Decodes the payload encoding; every read checks bounds, so no input can make it panic.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("truncated")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn arr<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        self.take(N)?.try_into().map_err(|_| "truncated")
    }
    pub(crate) fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.arr::<1>()?[0])
    }
    pub(crate) fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    /// A count, checked against the bytes left so garbage cannot trigger a huge allocation loop.
    pub(crate) fn count(&mut self) -> Result<usize, &'static str> {
        let n = self.u32()? as usize;
        if n > self.buf.len() - self.pos {
            return Err("count exceeds data");
        }
        Ok(n)
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn str(&mut self) -> Result<String, &'static str> {
        std::str::from_utf8(self.bytes()?).map(str::to_owned).map_err(|_| "string not UTF-8")
    }
    pub(crate) fn table(&mut self, depth: usize) -> Result<FieldTable, &'static str> {
        if depth > MAX_DEPTH {
            return Err("nesting too deep");
        }
        let mut map = BTreeMap::new();
        for _ in 0..self.count()? {
            let key = ShortString::try_new(self.str()?).map_err(|_| "table key too long")?;
            map.insert(key, self.value(depth)?);
        }
        Ok(FieldTable::from(map))
    }
    fn value(&mut self, depth: usize) -> Result<AMQPValue, &'static str> {
        Ok(match self.u8()? {
            b't' => AMQPValue::Boolean(self.u8()? != 0),
            b'b' => AMQPValue::ShortShortInt(self.u8()? as i8),
            b'B' => AMQPValue::ShortShortUInt(self.u8()?),
            b's' => AMQPValue::ShortInt(i16::from_le_bytes(self.arr()?)),
            b'u' => AMQPValue::ShortUInt(u16::from_le_bytes(self.arr()?)),
            b'I' => AMQPValue::LongInt(i32::from_le_bytes(self.arr()?)),
            b'i' => AMQPValue::LongUInt(u32::from_le_bytes(self.arr()?)),
            b'l' => AMQPValue::LongLongInt(i64::from_le_bytes(self.arr()?)),
            b'f' => AMQPValue::Float(f32::from_bits(u32::from_le_bytes(self.arr()?))),
            b'd' => AMQPValue::Double(f64::from_bits(u64::from_le_bytes(self.arr()?))),
            b'D' => {
                let scale = self.u8()?;
                AMQPValue::DecimalValue(DecimalValue { scale, value: self.u32()? })
            }
            b'S' => AMQPValue::LongString(LongString::from(self.bytes()?.to_vec())),
            b'_' => AMQPValue::ShortString(ShortString::try_new(self.str()?).map_err(|_| "short string too long")?),
            b'A' => {
                if depth >= MAX_DEPTH {
                    return Err("nesting too deep");
                }
                let mut items = Vec::new();
                for _ in 0..self.count()? {
                    items.push(self.value(depth + 1)?);
                }
                AMQPValue::FieldArray(FieldArray::from(items))
            }
            b'T' => AMQPValue::Timestamp(u64::from_le_bytes(self.arr()?)),
            b'F' => AMQPValue::FieldTable(self.table(depth + 1)?),
            b'x' => AMQPValue::ByteArray(ByteArray::from(self.bytes()?.to_vec())),
            b'V' => AMQPValue::Void,
            _ => return Err("unknown field type"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_value() -> FieldTable {
        let mut nested = FieldTable::default();
        nested.insert("count".into(), AMQPValue::LongLongInt(-3));
        let mut t = FieldTable::default();
        let values = vec![
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-5),
            AMQPValue::ShortShortUInt(250),
            AMQPValue::ShortInt(-300),
            AMQPValue::ShortUInt(60000),
            AMQPValue::LongInt(-70000),
            AMQPValue::LongUInt(4_000_000_000),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::Float(1.5),
            AMQPValue::Double(-2.25),
            AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 12345 }),
            AMQPValue::ShortString("short".into()),
            AMQPValue::LongString(LongString::from(vec![0u8, 255, 10])),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Void, AMQPValue::FieldTable(nested.clone())])),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(nested),
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
            AMQPValue::Void,
        ];
        for (i, v) in values.into_iter().enumerate() {
            t.insert(format!("k{i:02}").into(), v);
        }
        t
    }

    fn sample() -> Definitions {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongInt(60000));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("dlx".into()));
        Definitions {
            vhosts: vec![VhostDef { name: "/".into() }, VhostDef { name: "prod".into() }],
            users: vec![UserDef {
                name: "guest".into(),
                password: "guest".into(),
                loopback_only: true,
                tags: vec!["administrator".into()],
            }],
            exchanges: vec![ExchangeDef {
                vhost: "/".into(),
                name: "events".into(),
                kind: "topic".into(),
                auto_delete: false,
                internal: true,
                arguments: every_value(),
                generation: 0,
            }],
            queues: vec![QueueDef {
                vhost: "/".into(),
                name: "orders".into(),
                auto_delete: false,
                arguments: args,
                generation: 0,
            }],
            policies: vec![PolicyDef {
                vhost: "/".into(),
                name: "cap".into(),
                pattern: "^orders".into(),
                apply_to: "queues".into(),
                priority: -3,
                definition: every_value(),
            }],
            bindings: vec![
                BindingDef {
                    vhost: "/".into(),
                    source: "events".into(),
                    destination: "orders".into(),
                    destination_kind: DestinationKind::Queue,
                    routing_key: "order.*".into(),
                    arguments: every_value(),
                },
                BindingDef {
                    vhost: "/".into(),
                    source: "amq.topic".into(),
                    destination: "events".into(),
                    destination_kind: DestinationKind::Exchange,
                    routing_key: "#".into(),
                    arguments: FieldTable::default(),
                },
            ],
        }
    }

    #[test]
    fn files_without_policies_still_load() {
        let mut d = sample();
        d.policies.clear();
        let payload = d.encode();
        assert_eq!(Definitions::decode(&payload).unwrap(), d);
        let with = sample();
        assert_eq!(Definitions::decode(&with.encode()).unwrap(), with);
    }

    #[test]
    fn save_and_load_round_trip_every_field_type() {
        let dir = crate::store::queue_store::test_dir("defs");
        assert_eq!(Definitions::load(&dir).unwrap(), None);
        let d = sample();
        d.save(&dir).unwrap();
        assert_eq!(Definitions::load(&dir).unwrap(), Some(d.clone()));
        // Overwrite: the new version replaces the old one whole; no temp file is left behind.
        let mut d2 = d;
        d2.queues.clear();
        d2.save(&dir).unwrap();
        assert_eq!(Definitions::load(&dir).unwrap(), Some(d2));
        assert!(!dir.join(TMP_NAME).exists());
    }

    #[test]
    fn nan_floats_survive_bit_exact() {
        let mut t = FieldTable::default();
        t.insert("nan".into(), AMQPValue::Double(f64::NAN));
        let d = Definitions { queues: vec![QueueDef { arguments: t, ..Default::default() }], ..Default::default() };
        let back = Definitions::decode(&d.encode()).unwrap();
        match back.queues[0].arguments.inner().get("nan") {
            Some(AMQPValue::Double(f)) => assert!(f.is_nan()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damaged_files_are_errors_and_garbage_never_panics() {
        let dir = crate::store::queue_store::test_dir("defs-bad");
        sample().save(&dir).unwrap();
        let path = Definitions::path(&dir);
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n / 2] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(Definitions::load(&dir), Err(StoreError::BadDefinitions { .. })));
        let payload = sample().encode();
        // Cut exactly before the optional policies section, the payload is a valid older file (the file's
        // CRC, checked above, is what catches such a truncation on disk).
        let without_policies = Definitions { policies: Vec::new(), ..sample() }.encode().len();
        for cut in 0..payload.len() {
            if cut != without_policies {
                assert!(Definitions::decode(&payload[..cut]).is_err());
            }
        }
        let mut seed = 7u64;
        for _ in 0..3000 {
            let mut p = payload.clone();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let i = (seed >> 33) as usize % p.len();
            p[i] = (seed >> 13) as u8;
            let _ = Definitions::decode(&p);
        }
    }
}
