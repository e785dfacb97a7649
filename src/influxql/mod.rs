//! The InfluxQL read API's engine: the InfluxDB 1.x query language, for the queries
//! Grafana's InfluxDB datasource (query builder and template variables) sends, answered
//! from the embedded store. The HTTP side (`/query`, auth, parameters) is
//! `api::influxql`; this module knows nothing of HTTP.
//!
//! The data model is InfluxDB's view of what the sink writes: one measurement (the
//! sink's `measurement`, `telemetry` by default), tag `device` plus one tag per device
//! label key, one field per metric. One concept per file: [`lexer`] (text to tokens),
//! [`ast`] (what a statement asks), [`parser`] (recursive descent over the subset),
//! [`plan`] (pure: time range, tag conditions, buckets, aggregation), [`exec`] (reads
//! the store and the registry's labels within the query limits), [`encode`] (InfluxDB's
//! JSON answer and error shapes).
//!
//! The subset, in full:
//!
//! ```text
//! query     = statement { ";" statement }
//! statement = select | show
//! select    = SELECT field { "," field } FROM measurement [ WHERE cond ]
//!             [ GROUP BY dim { "," dim } ] [ fill( null | none | previous | number ) ]
//!             [ ORDER BY time [ ASC | DESC ] ] [ LIMIT n ] [ OFFSET n ] [ SLIMIT n ] [ SOFFSET n ]
//! field     = ( func "(" key ")" | key ) [ AS name ]      func = mean|min|max|first|last|count|sum
//! dim       = time( duration [ "," [-]duration ] ) | key | "*"
//! cond      = cond OR cond | cond AND cond | "(" cond ")"
//!           | key ( = | != ) 'string' | key ( =~ | !~ ) /regex/
//!           | time ( > | >= | < | <= | = ) timeexpr        (only ANDed at the top level)
//! timeexpr  = ( now() | epoch-ns | duration-since-epoch | 'RFC 3339' ) { ( + | - ) duration }
//! show      = SHOW DATABASES | SHOW RETENTION POLICIES [ON db]
//!           | SHOW MEASUREMENTS [ WITH MEASUREMENT ( =~ /re/ | = name ) ] [ LIMIT n ]
//!           | SHOW TAG KEYS [ FROM m ] [ LIMIT n ] | SHOW FIELD KEYS [ FROM m ] [ LIMIT n ]
//!           | SHOW TAG VALUES [ FROM m ] WITH KEY ( = k | != k | =~ /re/ | IN (k, ..) ) [ WHERE cond ] [ LIMIT n ]
//! ```
//!
//! Anything else is refused with an error naming the unsupported part.

pub mod ast;
pub mod encode;
pub mod exec;
pub mod lexer;
pub mod parser;
pub mod plan;

pub use encode::{Cell, Epoch, Series};
pub use exec::{Catalog, Source, execute};
pub use parser::parse;

/// Why a query or a statement could not be answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InfluxqlError {
    /// The text is not InfluxQL.
    #[error("{msg}")]
    Parse {
        /// Byte offset of the problem.
        pos: usize,
        /// What was wrong.
        msg: String,
    },
    /// Valid InfluxQL that fluxgate does not answer.
    #[error("fluxgate does not support {what}")]
    Unsupported {
        /// Byte offset of the unsupported part.
        pos: usize,
        /// The unsupported part, named.
        what: String,
    },
    /// The statement is well-formed but cannot be answered as asked (InfluxDB reports
    /// these per statement, too): a missing time bound, a bad regular expression, a
    /// condition on a field.
    #[error("{0}")]
    Invalid(String),
    /// Answering would exceed a query limit (shared with the REST history API).
    #[error("{0}")]
    TooLarge(String),
    /// Every store query slot stayed busy (the client may retry).
    #[error("too many store queries are running; retry shortly")]
    Busy,
    /// The embedded store is disabled.
    #[error("the embedded store is disabled (store.enabled)")]
    NoStore,
    /// The store failed; the cause is logged, not sent.
    #[error("internal error reading the store")]
    Internal,
}

impl InfluxqlError {
    /// The message InfluxDB would put in its `error` field: parse errors carry
    /// `error parsing query:` and the position as line and character.
    pub fn message(&self, text: &str) -> String {
        match self {
            InfluxqlError::Parse { pos, .. } | InfluxqlError::Unsupported { pos, .. } => {
                let before = text.get(..*pos).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("error parsing query: {self} at line {line}, char {col}")
            }
            other => other.to_string(),
        }
    }
}
