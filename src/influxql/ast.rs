//! The syntax tree of the InfluxQL subset fluxgate answers. It says what a statement
//! asks, before anything is looked up: times are still relative to `now()`, keys are
//! not yet known to be tags or fields.

/// One statement of a query (statements are separated by `;`).
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// `SELECT ...`
    Select(Select),
    /// `SHOW DATABASES`
    ShowDatabases,
    /// `SHOW RETENTION POLICIES [ON db]`
    ShowRetentionPolicies,
    /// `SHOW MEASUREMENTS [WITH MEASUREMENT =~ /re/ | = name] [LIMIT n]`
    ShowMeasurements {
        /// The `WITH MEASUREMENT` filter.
        filter: Option<NameFilter>,
        /// `LIMIT`
        limit: Option<usize>,
    },
    /// `SHOW TAG KEYS [FROM m] [LIMIT n]`
    ShowTagKeys {
        /// `FROM`
        from: Option<Measurement>,
        /// `LIMIT`
        limit: Option<usize>,
    },
    /// `SHOW TAG VALUES [FROM m] WITH KEY = "k" | IN ("a", ...) | =~ /re/ [WHERE ...] [LIMIT n]`
    ShowTagValues {
        /// `FROM`
        from: Option<Measurement>,
        /// Which tag keys.
        keys: NameFilter,
        /// `WHERE` on tags.
        cond: Option<Cond>,
        /// `LIMIT`
        limit: Option<usize>,
    },
    /// `SHOW FIELD KEYS [FROM m] [LIMIT n]`
    ShowFieldKeys {
        /// `FROM`
        from: Option<Measurement>,
        /// `LIMIT`
        limit: Option<usize>,
    },
}

/// Which names a `SHOW` statement lists.
#[derive(Debug, Clone, PartialEq)]
pub enum NameFilter {
    /// `= name`
    Eq(String),
    /// `!= name`
    Ne(String),
    /// `IN (a, b)`
    In(Vec<String>),
    /// `=~ /re/` (`negate` for `!~`)
    Regex {
        /// The pattern.
        pattern: String,
        /// `!~`
        negate: bool,
    },
}

/// A measurement reference, `"db"."rp"."m"` with the first two optional.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The database, when named.
    pub database: Option<String>,
    /// The retention policy, when named.
    pub retention_policy: Option<String>,
    /// The measurement name.
    pub name: String,
}

/// A `SELECT` statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    /// The select list (at least one).
    pub fields: Vec<SelectField>,
    /// `FROM`
    pub from: Measurement,
    /// `WHERE`
    pub cond: Option<Cond>,
    /// `GROUP BY time(..)`: interval and offset in nanoseconds.
    pub interval: Option<Interval>,
    /// `GROUP BY` tag keys, in the order written.
    pub group_tags: Vec<String>,
    /// `GROUP BY *`
    pub group_all_tags: bool,
    /// `fill(..)`
    pub fill: Fill,
    /// `ORDER BY time DESC`
    pub descending: bool,
    /// `LIMIT`: points per series.
    pub limit: Option<usize>,
    /// `OFFSET`: points per series skipped.
    pub offset: usize,
    /// `SLIMIT`: series.
    pub slimit: Option<usize>,
    /// `SOFFSET`: series skipped.
    pub soffset: usize,
}

/// `GROUP BY time(every, offset)`, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// Bucket width (> 0).
    pub every_ns: i64,
    /// Shift of the bucket boundaries.
    pub offset_ns: i64,
}

/// One entry of the select list.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectField {
    /// What is selected.
    pub expr: FieldExpr,
    /// `AS alias`
    pub alias: Option<String>,
}

/// A selected value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldExpr {
    /// A field's raw values.
    Raw(String),
    /// An aggregate or selector of a field.
    Call {
        /// The function.
        func: Func,
        /// The field.
        field: String,
    },
}

/// The functions fluxgate computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    /// Arithmetic mean (a float).
    Mean,
    /// Smallest value (a selector).
    Min,
    /// Largest value (a selector).
    Max,
    /// Value with the earliest time (a selector).
    First,
    /// Value with the latest time (a selector).
    Last,
    /// Number of values (an integer).
    Count,
    /// Sum of the values.
    Sum,
}

impl Func {
    /// The name as written and as the default column name.
    pub fn name(self) -> &'static str {
        match self {
            Func::Mean => "mean",
            Func::Min => "min",
            Func::Max => "max",
            Func::First => "first",
            Func::Last => "last",
            Func::Count => "count",
            Func::Sum => "sum",
        }
    }

    /// Look a function name up (case-insensitively).
    pub fn parse(name: &str) -> Option<Func> {
        Some(match name.to_ascii_lowercase().as_str() {
            "mean" => Func::Mean,
            "min" => Func::Min,
            "max" => Func::Max,
            "first" => Func::First,
            "last" => Func::Last,
            "count" => Func::Count,
            "sum" => Func::Sum,
            _ => return None,
        })
    }

    /// A selector returns one of the points it looked at (and, alone in a query without
    /// `GROUP BY time`, that point's time).
    pub fn is_selector(self) -> bool {
        matches!(self, Func::Min | Func::Max | Func::First | Func::Last)
    }
}

/// `fill(..)`: what an empty `GROUP BY time` bucket shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fill {
    /// `fill(null)` (the default): a row with nulls.
    Null,
    /// `fill(none)`: no row.
    None,
    /// `fill(previous)`: the previous bucket's value.
    Previous,
    /// `fill(<number>)`: that number.
    Number(f64),
}

/// A `WHERE` condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    /// Both hold.
    And(Box<Cond>, Box<Cond>),
    /// Either holds.
    Or(Box<Cond>, Box<Cond>),
    /// `key = 'v'` / `key != 'v'` on a tag (or, refused later, a field).
    Compare {
        /// The key.
        key: String,
        /// `=` or `!=`.
        negate: bool,
        /// The value compared with.
        value: Literal,
    },
    /// `key =~ /re/` / `key !~ /re/`
    Regex {
        /// The key.
        key: String,
        /// `!~`
        negate: bool,
        /// The pattern.
        pattern: String,
    },
    /// A comparison of another kind on a key (`<`, `>`, ...): only meaningful on fields,
    /// which fluxgate does not filter on; kept so the error can name it.
    Ordered {
        /// The key.
        key: String,
        /// The operator as written.
        op: &'static str,
    },
    /// `time <op> <time expression>`
    Time {
        /// The comparison.
        op: TimeOp,
        /// The bound.
        at: TimeExpr,
    },
}

/// A literal on the right of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `'text'`
    Str(String),
    /// A number.
    Number(f64),
    /// `true` / `false`
    Bool(bool),
}

/// How `time` is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeOp {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `=`
    Eq,
}

/// A point in time: `now()` or an absolute time, plus an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeExpr {
    /// Relative to `now()` (else to the epoch).
    pub now: bool,
    /// Nanoseconds added (to `now()` or the epoch).
    pub offset_ns: i64,
}

impl TimeExpr {
    /// Nanoseconds since the epoch, given `now()`; saturating.
    pub fn resolve(self, now_ns: i64) -> i64 {
        if self.now {
            now_ns.saturating_add(self.offset_ns)
        } else {
            self.offset_ns
        }
    }
}
