//! A generator of well-formed but hostile jobs, for the structure-aware fuzz target
//! `build_message` (`fuzz/`) and for replaying its regression inputs as ordinary tests
//! (`tests/fuzz_regressions.rs`).
//!
//! The fuzzer's bytes choose a [`HostileJob`] through `arbitrary`; [`HostileJob::render`] turns it
//! into the JSON a producer would publish. Every string can hold CR, LF, NUL, quotes, comments,
//! encoded-word look-alikes, IDNs and very long runs; recipients can number 10,000; attachments
//! get odd names and types; the JSON itself can be nested deep, carry unknown fields, duplicate
//! keys or invalid UTF-8. Rendering is deterministic: the same bytes give the same job.

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use serde_json::{Map, Value};

use amqp_mailer::job::Limits;

/// The most copies of one thing a single choice can ask for: enough for the 10,000-recipient job,
/// few enough that one input cannot ask for gigabytes.
const MAX_REPEAT: usize = 10_000;
/// The longest run of one word, in bytes; past every limit on a line (998) or a field.
const MAX_LONG: usize = 70_000;
/// The deepest nesting asked for; far past serde_json's recursion limit (128).
const MAX_DEPTH: usize = 100_000;
/// The most bytes of strings one job renders: past the default `worker.max_job_bytes` (5 MiB), so
/// that the size limit is reached, but bounded, so that a short input cannot ask for gigabytes
/// (10,000 recipients of 70 kB each) and time the fuzzer out on its own generator.
const BUDGET: usize = 6 * 1024 * 1024;

/// What is left of [`BUDGET`] while a job renders.
struct Budget(usize);

impl Budget {
    /// How many of `wanted` bytes may still be rendered (and takes them).
    fn take(&mut self, wanted: usize) -> usize {
        let granted = wanted.min(self.0);
        self.0 -= granted;
        granted
    }

    /// Appends `text`, cut (at a character boundary) to what is left.
    fn push(&mut self, out: &mut String, text: &str) {
        let mut n = self.take(text.len());
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        out.push_str(&text[..n]);
    }
}

/// A job chosen by the fuzzer's bytes: each field a hostile choice, rendered by [`HostileJob::render`].
#[derive(Arbitrary, Debug, Clone)]
pub struct HostileJob {
    pub limits: LimitChoice,
    pub id: Option<HText>,
    pub from: Option<HAddr>,
    pub reply_to: Recipients,
    pub to: Recipients,
    pub cc: Recipients,
    pub bcc: Recipients,
    pub subject: Maybe<HText>,
    pub text: Maybe<HText>,
    pub html: Option<HText>,
    pub headers: Option<Vec<(HName, HText)>>,
    pub attachments: Option<Vec<HAttachment>>,
    pub extra: Vec<Extra>,
    pub mangle: Option<Mangle>,
}

/// Present unless the fuzzer says otherwise: a job made from too few bytes (every choice its first)
/// is then a valid one, and mutations explore outward from a job that gets built.
#[derive(Arbitrary, Debug, Clone)]
pub enum Maybe<T> {
    Given(T),
    Absent,
}

impl<T> Maybe<T> {
    fn as_option(&self) -> Option<&T> {
        match self {
            Maybe::Given(value) => Some(value),
            Maybe::Absent => None,
        }
    }
}

/// Which limits the job is decoded with.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum LimitChoice {
    /// The configuration's defaults.
    Default,
    /// Tiny limits, reached by short inputs.
    Small,
    /// Generous limits, so that 10,000 recipients and long headers reach the message builder.
    Large,
}

impl LimitChoice {
    /// The limits this choice stands for.
    pub fn limits(self) -> Limits {
        match self {
            LimitChoice::Default => Limits::default(),
            LimitChoice::Small => crate::invariants::small_limits(),
            LimitChoice::Large => Limits {
                max_job_bytes: 5 * 1024 * 1024,
                max_recipients: 20_000,
                max_attachments: 100,
                max_attachment_bytes: 4 * 1024 * 1024,
                max_headers: 1000,
                max_header_bytes: 998,
            },
        }
    }
}

/// A string built from hostile pieces.
#[derive(Arbitrary, Debug, Clone)]
pub struct HText(pub Vec<Piece>);

/// One piece of a hostile string.
#[derive(Arbitrary, Debug, Clone)]
pub enum Piece {
    Word(Word),
    /// Whatever the fuzzer likes (any Unicode scalar values).
    Text(String),
    Char(char),
    Space,
    Tab,
    Cr,
    Lf,
    CrLf,
    Nul,
    /// Another C0 or C1 control character, or DEL.
    Control(u8),
    Quote,
    Backslash,
    Comment(Word),
    Angle(Word),
    Comma,
    Semicolon,
    Colon,
    At,
    Dot,
    EncodedWord(EncodedWord),
    Idn(Idn),
    /// A header injection written out: CRLF, then a header line.
    HeaderLine(InjectedHeader),
    /// A MIME boundary line: `--x`, `--x--`.
    Boundary(bool),
    /// One word repeated: long runs with no place to fold.
    Long(Word, Len),
    /// Non-ASCII that needs encoding: Latin, CJK, emoji, RTL override, zero-width.
    Unicode(UnicodeSample),
}

/// An ordinary word, so that hostile strings also look like text.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Word {
    Ann,
    Evil,
    Example,
    X,
    Digits,
    Bcc,
    Dashes,
    Equals,
    Question,
}

impl Word {
    fn as_str(self) -> &'static str {
        match self {
            Word::Ann => "ann",
            Word::Evil => "evil",
            Word::Example => "example",
            Word::X => "x",
            Word::Digits => "0123456789",
            Word::Bcc => "Bcc",
            Word::Dashes => "--",
            Word::Equals => "=",
            Word::Question => "?",
        }
    }
}

/// Non-ASCII text: other scripts, emoji, and the invisible or reordering characters.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum UnicodeSample {
    Latin,
    Cjk,
    Emoji,
    RightToLeftOverride,
    ZeroWidthJoiner,
    LineSeparator,
    Bom,
}

impl UnicodeSample {
    fn as_str(self) -> &'static str {
        match self {
            UnicodeSample::Latin => "Grüße",
            UnicodeSample::Cjk => "你好",
            UnicodeSample::Emoji => "📧",
            UnicodeSample::RightToLeftOverride => "\u{202e}fdp.exe",
            UnicodeSample::ZeroWidthJoiner => "a\u{200d}b",
            UnicodeSample::LineSeparator => "a\u{2028}b\u{2029}c\u{85}d",
            UnicodeSample::Bom => "\u{feff}",
        }
    }
}

/// A header line smuggled into a string after a CR/LF.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum InjectedHeader {
    Bcc,
    To,
    ContentType,
    Subject,
    /// A blank line: the body would start here.
    Blank,
}

impl InjectedHeader {
    fn as_str(self) -> &'static str {
        match self {
            InjectedHeader::Bcc => "\r\nBcc: victim@evil.example",
            InjectedHeader::To => "\nTo: victim@evil.example",
            InjectedHeader::ContentType => {
                "\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
            }
            InjectedHeader::Subject => "\rSubject: injected",
            InjectedHeader::Blank => "\r\n\r\ninjected body",
        }
    }
}

/// An RFC 2047 encoded word, or something that looks like one.
#[derive(Arbitrary, Debug, Clone)]
pub struct EncodedWord {
    pub charset: Charset,
    pub base64: bool,
    pub payload: Payload,
}

/// The charset named in an encoded-word look-alike.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Charset {
    Utf8,
    Upper,
    Latin1,
    Bogus,
    Empty,
}

/// What an encoded-word look-alike decodes to.
#[derive(Arbitrary, Debug, Clone)]
pub enum Payload {
    /// Decodes to CRLF and a Bcc header.
    BccInjection,
    /// Decodes to a bare LF and a header.
    LfInjection,
    Nul,
    /// Decodes to a quote, a comma and another address: a recipient list injection.
    AddressInjection,
    Text(String),
    /// Not valid in the encoding named.
    Garbage(String),
}

/// An internationalized domain label.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Idn {
    German,
    Japanese,
    Punycode,
    MixedScript,
    Fullwidth,
}

impl Idn {
    fn as_str(self) -> &'static str {
        match self {
            Idn::German => "bücher.example",
            Idn::Japanese => "例え.テスト",
            Idn::Punycode => "xn--bcher-kva.example",
            Idn::MixedScript => "раураl.example",
            Idn::Fullwidth => "ｅｘａｍｐｌｅ．com",
        }
    }
}

/// An address, from plain to very odd.
#[derive(Arbitrary, Debug, Clone)]
pub enum HAddr {
    Plain(Local, Domain),
    Named(HText, Local, Domain),
    QuotedName(HText, Local, Domain),
    Commented(Local, Domain, HText),
    QuotedLocal(HText, Domain),
    /// Several addresses in one string: must be refused or read as one mailbox.
    List(Vec<(Local, Domain)>),
    Group(HText, Vec<(Local, Domain)>),
    Raw(HText),
}

/// The local part of an address.
#[derive(Arbitrary, Debug, Clone)]
pub enum Local {
    Word(Word),
    Text(HText),
    Long(Len),
    Tagged(Word, Word),
    Dotted(Word, Word),
}

/// The domain of an address.
#[derive(Arbitrary, Debug, Clone)]
pub enum Domain {
    Example,
    Sub(Word),
    Idn(Idn),
    /// An address literal `[1.2.3.4]`.
    Literal([u8; 4]),
    Ipv6,
    Long(Len),
    Text(HText),
}

/// `to`, `cc`, `bcc`, `reply_to`: one string, a list, many numbered copies, absent, or junk.
#[derive(Arbitrary, Debug, Clone)]
pub enum Recipients {
    One(HAddr),
    List(Vec<HAddr>),
    /// The same address, numbered: `ann0@…`, `ann1@…`.
    Many(Local, Domain, Count),
    Absent,
    /// Not a string nor a list of strings.
    WrongType(Junk),
}

/// How many: few by default (fast to run), the limits' edges, or 10,000.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Count {
    Few(u8),
    Hundred,
    HundredAndOne,
    TenThousand,
    Exactly(u16),
}

impl Count {
    fn get(self) -> usize {
        match self {
            Count::Few(n) => usize::from(n % 8),
            Count::Hundred => 100,
            Count::HundredAndOne => 101,
            Count::TenThousand => MAX_REPEAT,
            Count::Exactly(n) => usize::from(n) % (MAX_REPEAT + 1),
        }
    }
}

/// How long a run of one character or word is: short by default (fast to run), just past a
/// line's 998 bytes, or up to 70 kB.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Short(u8),
    PastALine(u8),
    Huge(u32),
}

impl Len {
    fn get(self) -> usize {
        match self {
            Len::Short(n) => usize::from(n),
            Len::PastALine(n) => 990 + usize::from(n % 20),
            Len::Huge(n) => n as usize % MAX_LONG,
        }
    }
}

/// The name of a header the job declares.
#[derive(Arbitrary, Debug, Clone)]
pub enum HName {
    /// `X-` and a word: a plain custom header.
    Custom(Word),
    /// A header the worker writes, or one that names recipients or MIME structure.
    Reserved(Reserved, Case),
    Text(HText),
    Long(u32),
}

/// A header name the worker writes itself (the job may not).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Reserved {
    From,
    To,
    Cc,
    Bcc,
    MessageId,
    Date,
    ContentType,
    MimeVersion,
    ReplyTo,
    Subject,
    Sender,
    ContentTransferEncoding,
    ContentDisposition,
    ContentDescription,
    ContentLocation,
    ResentBcc,
    ReturnPath,
    Received,
}

impl Reserved {
    fn as_str(self) -> &'static str {
        match self {
            Reserved::From => "From",
            Reserved::To => "To",
            Reserved::Cc => "Cc",
            Reserved::Bcc => "Bcc",
            Reserved::MessageId => "Message-ID",
            Reserved::Date => "Date",
            Reserved::ContentType => "Content-Type",
            Reserved::MimeVersion => "MIME-Version",
            Reserved::ReplyTo => "Reply-To",
            Reserved::Subject => "Subject",
            Reserved::Sender => "Sender",
            Reserved::ContentTransferEncoding => "Content-Transfer-Encoding",
            Reserved::ContentDisposition => "Content-Disposition",
            Reserved::ContentDescription => "Content-Description",
            Reserved::ContentLocation => "Content-Location",
            Reserved::ResentBcc => "Resent-Bcc",
            Reserved::ReturnPath => "Return-Path",
            Reserved::Received => "Received",
        }
    }
}

/// How a reserved header name is spelt.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Case {
    AsIs,
    Lower,
    Upper,
    /// A trailing space or colon, which a lax parser would still read as the header.
    Padded,
}

/// An attachment with hostile name, type and content.
#[derive(Arbitrary, Debug, Clone)]
pub struct HAttachment {
    pub filename: Option<HFilename>,
    pub content_type: Option<HContentType>,
    pub content: HContent,
}

/// An attachment's file name.
#[derive(Arbitrary, Debug, Clone)]
pub enum HFilename {
    Text(HText),
    Traversal,
    /// Closes the quoted parameter and adds another.
    ParameterInjection,
    Long(u32),
    Unicode(UnicodeSample),
    Encoded(EncodedWord),
    Empty,
}

/// An attachment's content type.
#[derive(Arbitrary, Debug, Clone)]
pub enum HContentType {
    Known(KnownType),
    /// A multipart type: its content would be read as MIME parts.
    Multipart(HText),
    Text(HText),
}

/// A common content type, written correctly.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum KnownType {
    Pdf,
    Text,
    Html,
    Rfc822,
    Octet,
    WithParameters,
}

impl KnownType {
    fn as_str(self) -> &'static str {
        match self {
            KnownType::Pdf => "application/pdf",
            KnownType::Text => "text/plain",
            KnownType::Html => "text/html; charset=utf-8",
            KnownType::Rfc822 => "message/rfc822",
            KnownType::Octet => "application/octet-stream",
            KnownType::WithParameters => "text/plain; charset=\"us-ascii\"; name=\"x\"",
        }
    }
}

/// An attachment's content.
#[derive(Arbitrary, Debug, Clone)]
pub enum HContent {
    Bytes(Vec<u8>),
    Text(HText),
    /// Base64 wrapped at 76 columns, as many producers send it.
    Wrapped(Vec<u8>),
    /// A MIME part, boundary lines and all: harmless inside a base64 attachment, an extra part
    /// if ever written raw under a multipart type.
    MimeInjection,
    /// An e-mail, for message/rfc822.
    Email,
    /// Zeros, up to 5 MiB: past the attachment limits.
    Big(Len, u8),
    /// Not base64 at all.
    NotBase64(HText),
}

/// Other things a job can hold.
#[derive(Arbitrary, Debug, Clone)]
pub enum Extra {
    /// A field the job format does not know (a typo).
    Unknown(Word, Junk),
    /// A known field holding deeply nested arrays.
    Deep(Field, u32),
}

/// The field that holds deeply nested arrays ([`Extra::Deep`]).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Field {
    To,
    Subject,
    Headers,
    Attachments,
    Unknown,
}

impl Field {
    fn as_str(self) -> &'static str {
        match self {
            Field::To => "to",
            Field::Subject => "subject",
            Field::Headers => "headers",
            Field::Attachments => "attachments",
            Field::Unknown => "nested",
        }
    }
}

/// A JSON value of the wrong kind.
#[derive(Arbitrary, Debug, Clone)]
pub enum Junk {
    Null,
    Bool(bool),
    Number(i64),
    Float(f64),
    Text(String),
    Object(Vec<(String, String)>),
    NumberList(Vec<i32>),
}

/// Changes to the rendered bytes: things serde_json would never write.
#[derive(Arbitrary, Debug, Clone)]
pub enum Mangle {
    InvalidUtf8 {
        at: u32,
        byte: u8,
    },
    Truncate(u32),
    ByteOrderMark,
    TrailingGarbage(Vec<u8>),
    /// The first key written twice.
    DuplicateKey,
    Whitespace(u16),
    /// A raw (unescaped) control character inside the first string.
    RawControl(u8),
}

impl HostileJob {
    /// The job from fuzzer bytes; `None` when the bytes run out before the job is chosen.
    pub fn from_bytes(data: &[u8]) -> Option<Self> {
        Self::arbitrary_take_rest(Unstructured::new(data)).ok()
    }

    /// The JSON a producer would publish.
    pub fn render(&self) -> Vec<u8> {
        let b = &mut Budget(BUDGET);
        let mut deep = Vec::new();
        let mut map = Map::new();
        if let Some(id) = &self.id {
            map.insert("id".into(), Value::String(id.render(b)));
        }
        if let Some(from) = &self.from {
            map.insert("from".into(), Value::String(from.render(b)));
        }
        for (field, recipients) in [
            ("reply_to", &self.reply_to),
            ("to", &self.to),
            ("cc", &self.cc),
            ("bcc", &self.bcc),
        ] {
            if let Some(value) = recipients.render(b) {
                map.insert(field.into(), value);
            }
        }
        for (field, text) in [
            ("subject", self.subject.as_option()),
            ("text", self.text.as_option()),
            ("html", self.html.as_ref()),
        ] {
            if let Some(text) = text {
                map.insert(field.into(), Value::String(text.render(b)));
            }
        }
        if let Some(headers) = &self.headers {
            let headers: Map<String, Value> = headers
                .iter()
                .map(|(name, value)| (name.render(b), Value::String(value.render(b))))
                .collect();
            map.insert("headers".into(), Value::Object(headers));
        }
        if let Some(attachments) = &self.attachments {
            map.insert(
                "attachments".into(),
                Value::Array(attachments.iter().map(|a| a.render(b)).collect()),
            );
        }
        for extra in &self.extra {
            match extra {
                Extra::Unknown(word, junk) => {
                    map.insert(format!("x_{}", word.as_str()), junk.render(b));
                }
                Extra::Deep(field, depth) => {
                    // serde_json would recurse as deep to build or write the nesting itself:
                    // a placeholder now, the brackets spliced in as text below.
                    let marker = format!("\u{1}deep{}\u{1}", deep.len());
                    deep.push((marker.clone(), b.take(*depth as usize % MAX_DEPTH * 2) / 2));
                    map.insert(field.as_str().into(), Value::String(marker));
                }
            }
        }
        let mut text = Value::Object(map).to_string();
        for (marker, depth) in deep {
            let quoted = Value::String(marker).to_string();
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            text = text.replacen(&quoted, &nested, 1);
        }
        let mut bytes = text.into_bytes();
        if let Some(mangle) = &self.mangle {
            mangle.apply(&mut bytes);
        }
        bytes
    }
}

impl Mangle {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            Mangle::InvalidUtf8 { at, byte } => {
                let at = *at as usize % (bytes.len() + 1);
                // 0x80..=0xFF alone is never valid UTF-8 after ASCII.
                bytes.insert(at, 0x80 | byte);
            }
            Mangle::Truncate(at) => bytes.truncate(*at as usize % (bytes.len() + 1)),
            Mangle::ByteOrderMark => {
                bytes.splice(0..0, [0xEF, 0xBB, 0xBF]);
            }
            Mangle::TrailingGarbage(garbage) => bytes.extend_from_slice(garbage),
            Mangle::DuplicateKey => {
                // `{"a":…` becomes `{"a":"dup","a":…`.
                if let Some(colon) = bytes.iter().position(|&b| b == b':') {
                    let mut insert = bytes[1..colon].to_vec();
                    insert.extend_from_slice(b":\"dup\",");
                    bytes.splice(1..1, insert);
                }
            }
            Mangle::Whitespace(n) => {
                let pad = vec![b' '; usize::from(*n) % 10_000];
                bytes.splice(0..0, pad);
            }
            Mangle::RawControl(c) => {
                if let Some(quote) = bytes.iter().position(|&b| b == b'"') {
                    bytes.insert(quote + 1, c % 0x20);
                }
            }
        }
    }
}

impl HText {
    fn render(&self, b: &mut Budget) -> String {
        let mut out = String::new();
        for piece in &self.0 {
            piece.render_into(&mut out, b);
        }
        out
    }
}

impl Piece {
    fn render_into(&self, out: &mut String, b: &mut Budget) {
        let owned;
        let text: &str = match self {
            Piece::Word(word) => word.as_str(),
            Piece::Text(text) => text,
            Piece::Char(c) => {
                owned = c.to_string();
                &owned
            }
            Piece::Space => " ",
            Piece::Tab => "\t",
            Piece::Cr => "\r",
            Piece::Lf => "\n",
            Piece::CrLf => "\r\n",
            Piece::Nul => "\0",
            Piece::Control(c) => {
                owned = match c % 34 {
                    32 => '\u{7f}',
                    33 => '\u{85}',
                    c => char::from(c),
                }
                .to_string();
                &owned
            }
            Piece::Quote => "\"",
            Piece::Backslash => "\\",
            Piece::Comment(word) => {
                owned = format!("({})", word.as_str());
                &owned
            }
            Piece::Angle(word) => {
                owned = format!("<{}>", word.as_str());
                &owned
            }
            Piece::Comma => ",",
            Piece::Semicolon => ";",
            Piece::Colon => ":",
            Piece::At => "@",
            Piece::Dot => ".",
            Piece::EncodedWord(word) => {
                owned = word.render();
                &owned
            }
            Piece::Idn(idn) => idn.as_str(),
            Piece::HeaderLine(header) => header.as_str(),
            Piece::Boundary(last) => {
                if *last {
                    "\r\n--x--\r\n"
                } else {
                    "\r\n--x\r\n"
                }
            }
            Piece::Long(word, n) => {
                let word = word.as_str();
                let times = n.get() / word.len() + 1;
                owned = word.repeat(b.take(times * word.len()) / word.len());
                out.push_str(&owned);
                return;
            }
            Piece::Unicode(sample) => sample.as_str(),
        };
        b.push(out, text);
    }
}

impl EncodedWord {
    fn render(&self) -> String {
        let charset = match self.charset {
            Charset::Utf8 => "utf-8",
            Charset::Upper => "UTF-8",
            Charset::Latin1 => "iso-8859-1",
            Charset::Bogus => "x-bogus",
            Charset::Empty => "",
        };
        let payload: Vec<u8> = match &self.payload {
            Payload::BccInjection => b"\r\nBcc: x@evil.example".to_vec(),
            Payload::LfInjection => b"\nX-Injected: yes".to_vec(),
            Payload::Nul => b"a\0b".to_vec(),
            Payload::AddressInjection => b"\", victim@evil.example, \"".to_vec(),
            Payload::Text(text) => text.as_bytes().to_vec(),
            Payload::Garbage(text) => {
                let encoding = if self.base64 { "b" } else { "q" };
                return format!("=?{charset}?{encoding}?{text}?=");
            }
        };
        if self.base64 {
            format!(
                "=?{charset}?b?{}?=",
                base64::engine::general_purpose::STANDARD.encode(payload)
            )
        } else {
            let q: String = payload
                .iter()
                .map(|&b| {
                    if b.is_ascii_alphanumeric() {
                        char::from(b).to_string()
                    } else {
                        format!("={b:02X}")
                    }
                })
                .collect();
            format!("=?{charset}?q?{q}?=")
        }
    }
}

impl Local {
    fn render(&self, b: &mut Budget) -> String {
        match self {
            Local::Word(word) => word.as_str().into(),
            Local::Text(text) => text.render(b),
            Local::Long(n) => "a".repeat(b.take(n.get() + 1)),
            Local::Tagged(x, y) => format!("{}+{}", x.as_str(), y.as_str()),
            Local::Dotted(x, y) => format!("{}.{}", x.as_str(), y.as_str()),
        }
    }
}

impl Domain {
    fn render(&self, b: &mut Budget) -> String {
        match self {
            Domain::Example => "example.com".into(),
            Domain::Sub(word) => format!("{}.example.net", word.as_str()),
            Domain::Idn(idn) => idn.as_str().into(),
            Domain::Literal([w, x, y, z]) => format!("[{w}.{x}.{y}.{z}]"),
            Domain::Ipv6 => "[IPv6:::1]".into(),
            Domain::Long(n) => {
                format!("{}.example", "d".repeat(b.take(n.get() + 1)))
            }
            Domain::Text(text) => text.render(b),
        }
    }
}

fn address(local: &Local, domain: &Domain, b: &mut Budget) -> String {
    format!("{}@{}", local.render(b), domain.render(b))
}

fn addresses(list: &[(Local, Domain)], b: &mut Budget) -> String {
    list.iter()
        .map(|(local, domain)| address(local, domain, b))
        .collect::<Vec<_>>()
        .join(", ")
}

impl HAddr {
    fn render(&self, b: &mut Budget) -> String {
        match self {
            HAddr::Plain(local, domain) => address(local, domain, b),
            HAddr::Named(name, local, domain) => {
                format!("{} <{}>", name.render(b), address(local, domain, b))
            }
            HAddr::QuotedName(name, local, domain) => {
                format!("\"{}\" <{}>", name.render(b), address(local, domain, b))
            }
            HAddr::Commented(local, domain, comment) => {
                format!("{} ({})", address(local, domain, b), comment.render(b))
            }
            HAddr::QuotedLocal(local, domain) => {
                format!("\"{}\"@{}", local.render(b), domain.render(b))
            }
            HAddr::List(list) => addresses(list, b),
            HAddr::Group(name, list) => format!("{}: {};", name.render(b), addresses(list, b)),
            HAddr::Raw(text) => text.render(b),
        }
    }
}

impl Recipients {
    fn render(&self, b: &mut Budget) -> Option<Value> {
        match self {
            Recipients::Absent => None,
            Recipients::One(addr) => Some(Value::String(addr.render(b))),
            Recipients::List(list) => Some(Value::Array(
                list.iter().map(|a| Value::String(a.render(b))).collect(),
            )),
            Recipients::Many(local, domain, n) => {
                let (local, domain) = (local.render(b), domain.render(b));
                let each = local.len() + domain.len() + 10;
                let n = b.take(n.get() * each) / each;
                Some(Value::Array(
                    (0..n)
                        .map(|i| Value::String(format!("{local}{i}@{domain}")))
                        .collect(),
                ))
            }
            Recipients::WrongType(junk) => Some(junk.render(b)),
        }
    }
}

impl HName {
    fn render(&self, b: &mut Budget) -> String {
        match self {
            HName::Custom(word) => format!("X-{}", word.as_str()),
            HName::Reserved(name, case) => match case {
                Case::AsIs => name.as_str().into(),
                Case::Lower => name.as_str().to_ascii_lowercase(),
                Case::Upper => name.as_str().to_ascii_uppercase(),
                Case::Padded => format!("{} ", name.as_str()),
            },
            HName::Text(text) => text.render(b),
            HName::Long(n) => format!("X-{}", "h".repeat(b.take(*n as usize % 2000))),
        }
    }
}

impl HAttachment {
    fn render(&self, b: &mut Budget) -> Value {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let mut map = Map::new();
        if let Some(filename) = &self.filename {
            let name = match filename {
                HFilename::Text(text) => text.render(b),
                HFilename::Traversal => "../../etc/passwd".into(),
                HFilename::ParameterInjection => "a.txt\"; filename=\"evil.exe".into(),
                HFilename::Long(n) => format!("{}.pdf", "f".repeat(b.take(*n as usize % 2000))),
                HFilename::Unicode(sample) => format!("{}.txt", sample.as_str()),
                HFilename::Encoded(word) => word.render(),
                HFilename::Empty => String::new(),
            };
            map.insert("filename".into(), Value::String(name));
        }
        if let Some(content_type) = &self.content_type {
            let content_type = match content_type {
                HContentType::Known(known) => known.as_str().into(),
                HContentType::Multipart(boundary) => {
                    format!("multipart/mixed; boundary=\"{}\"", boundary.render(b))
                }
                HContentType::Text(text) => text.render(b),
            };
            map.insert("content_type".into(), Value::String(content_type));
        }
        let content = match &self.content {
            HContent::Bytes(bytes) => b64(bytes),
            HContent::Text(text) => b64(text.render(b).as_bytes()),
            HContent::Wrapped(bytes) => {
                let flat = b64(bytes);
                let lines: Vec<&str> = flat
                    .as_bytes()
                    .chunks(76)
                    .map(|c| std::str::from_utf8(c).unwrap_or_default())
                    .collect();
                lines.join("\n")
            }
            HContent::MimeInjection => b64(b"--x\r\nContent-Type: text/plain\r\n\
                  Bcc: victim@evil.example\r\n\r\ninjected\r\n--x--\r\n"),
            HContent::Email => b64(b"From: a@example.com\r\nTo: victim@evil.example\r\n\
                  Bcc: victim@evil.example\r\nSubject: inner\r\n\r\nhello\r\n"),
            HContent::Big(n, times) => {
                // Up to 70 kB × 75: past the attachment limit (4 MiB) and the job size (5 MiB).
                let wanted = n.get() * (usize::from(*times) % 76);
                let len = b.take(wanted / 3 * 4) / 4 * 3;
                b64(&vec![0u8; len])
            }
            HContent::NotBase64(text) => text.render(b),
        };
        map.insert("content_base64".into(), Value::String(content));
        Value::Object(map)
    }
}

impl Junk {
    fn render(&self, b: &mut Budget) -> Value {
        match self {
            Junk::Null => Value::Null,
            Junk::Bool(x) => Value::Bool(*x),
            Junk::Number(n) => Value::from(*n),
            Junk::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Junk::Text(text) => {
                let mut out = String::new();
                b.push(&mut out, text);
                Value::String(out)
            }
            Junk::Object(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
            Junk::NumberList(list) => Value::Array(list.iter().map(|n| Value::from(*n)).collect()),
        }
    }
}
