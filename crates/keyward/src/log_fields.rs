//! How the text log writes span and event fields: exactly as `tracing-subscriber`'s `DefaultFields`
//! does without colours (`name="text" other=value`, the message bare), but text values go straight
//! into the line. Every request opens a span whose fields are formatted when it opens, whether or not a
//! line is ever written in it; the default formatter sends each string through `Debug` (an escape
//! check per character) and each name through the colour wrapper even when colours are off: a good
//! part of the request span's cost, which every request pays. With colours on, the default formatter
//! writes everything.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

#[derive(Debug, Default)]
pub struct PlainFields {
    colours: DefaultFields,
}

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.colours.format_fields(writer, fields);
        }
        let mut visitor = Visitor { writer, empty: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'writer> {
    writer: Writer<'writer>,
    empty: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// `name=` after a space unless first; `None` for a field the default formatter leaves out.
    fn name(&mut self, field: &Field) -> Option<()> {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result =
                self.result.and_then(|()| self.writer.write_str(name)).and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok().then_some(())
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.name(field).is_none() {
            return;
        }
        self.result = if field.name() == "message" {
            self.writer.write_str(value)
        } else if value.bytes().all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\') {
            // What `Debug` writes for such a string, without its per-character escaping.
            self.writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'))
        } else {
            write!(self.writer, "{value:?}")
        };
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.name(field).is_some() {
            self.result = write!(self.writer, "{value:?}");
        }
    }

    /// The error, then its chain of sources as the default formatter lists them.
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.name(field).is_none() {
            return;
        }
        self.result = write!(self.writer, "{value}");
        let Some(mut source) = value.source() else { return };
        let name = field.name().strip_prefix("r#").unwrap_or(field.name());
        self.result = self.result.and_then(|()| write!(self.writer, " {name}.sources=["));
        loop {
            self.result = self.result.and_then(|()| write!(self.writer, "{source}"));
            match source.source() {
                Some(next) => {
                    source = next;
                    self.result = self.result.and_then(|()| self.writer.write_str(", "));
                }
                None => break,
            }
        }
        self.result = self.result.and_then(|()| self.writer.write_char(']'));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// An error with a source.
    #[derive(Debug)]
    struct Layered(&'static str, std::io::Error);

    impl fmt::Display for Layered {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layered {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }

    /// The same spans and events through a formatter: what it wrote.
    fn lines<N: for<'w> FormatFields<'w> + Send + Sync + 'static>(fields: N) -> String {
        let buffer = Buffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let path = "/v1/keys/{id}";
            let span = tracing::info_span!(
                "request",
                method = "POST",
                path,
                request_id = "a \"quoted\" id\\",
                key_id = tracing::field::Empty,
                r#type = "plain",
            );
            let _entered = span.enter();
            span.record("key_id", tracing::field::display("01a2-ff"));
            tracing::info!(count = 3, ok = true, ratio = 0.5, who = ?Some("x"), note = "tab\there", "answered {}", 7);
            tracing::warn!(unicode = "clé", empty = "", "plain message");
            let cause = std::io::Error::other("disk full");
            let error = std::io::Error::other(Layered("writing the batch", cause));
            tracing::error!(
                error = &error as &(dyn std::error::Error + 'static),
                plain = &std::io::Error::other("x") as &(dyn std::error::Error + 'static),
                "failed"
            );
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert!(text.lines().count() == 3, "{text}");
        text
    }

    #[test]
    fn writes_what_the_default_formatter_writes() {
        assert_eq!(lines(PlainFields::default()), lines(DefaultFields::new()));
    }
}
