//! The pure part of answering a statement: the time range a `WHERE` clause allows, the
//! tag condition compiled (regular expressions with size limits: they come from
//! untrusted clients), `GROUP BY time` buckets, and the aggregate functions over a
//! bucket's points. No I/O; `exec` feeds it what it read.

use regex::{Regex, RegexBuilder};

use super::InfluxqlError;
use super::ast::{Cond, Func, Interval, Literal, TimeOp};
use super::encode::Cell;
use crate::model::Value;

/// Longest regular expression accepted, in bytes.
pub const MAX_REGEX_LEN: usize = 4_096;
/// Compiled-program and lazy-DFA size limit per regular expression, in bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Nanoseconds per millisecond (the store keeps ms).
const NS_PER_MS: i64 = 1_000_000;

/// The time range of a statement in nanoseconds, both ends inclusive; `None` is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeBounds {
    /// Earliest time allowed.
    pub lo_ns: Option<i64>,
    /// Latest time allowed.
    pub hi_ns: Option<i64>,
}

impl TimeBounds {
    fn add(&mut self, op: TimeOp, at: i64) {
        let lo = match op {
            TimeOp::Ge | TimeOp::Eq => Some(at),
            TimeOp::Gt => Some(at.saturating_add(1)),
            _ => None,
        };
        let hi = match op {
            TimeOp::Le | TimeOp::Eq => Some(at),
            TimeOp::Lt => Some(at.saturating_sub(1)),
            _ => None,
        };
        if let Some(lo) = lo {
            self.lo_ns = Some(self.lo_ns.map_or(lo, |c| c.max(lo)));
        }
        if let Some(hi) = hi {
            self.hi_ns = Some(self.hi_ns.map_or(hi, |c| c.min(hi)));
        }
    }

    /// The store's half-open `[from_ms, to_ms)` covering the same points.
    pub fn to_ms(self) -> (i64, i64) {
        let from = self.lo_ns.map_or(i64::MIN, |lo| {
            lo.div_euclid(NS_PER_MS) + i64::from(lo.rem_euclid(NS_PER_MS) != 0)
        });
        let to = self
            .hi_ns
            .map_or(i64::MAX, |hi| hi.div_euclid(NS_PER_MS).saturating_add(1));
        (from, to)
    }
}

fn mentions_time(c: &Cond) -> bool {
    match c {
        Cond::Time { .. } => true,
        Cond::And(a, b) | Cond::Or(a, b) => mentions_time(a) || mentions_time(b),
        _ => false,
    }
}

/// Split a `WHERE` clause into its time bounds (which must be ANDed at the top level)
/// and the rest.
pub fn split_time(
    cond: Option<&Cond>,
    now_ns: i64,
) -> Result<(TimeBounds, Option<Cond>), InfluxqlError> {
    let mut bounds = TimeBounds::default();
    let rest = match cond {
        Some(c) => split(c, now_ns, &mut bounds)?,
        None => None,
    };
    Ok((bounds, rest))
}

fn split(c: &Cond, now_ns: i64, bounds: &mut TimeBounds) -> Result<Option<Cond>, InfluxqlError> {
    match c {
        Cond::Time { op, at } => {
            bounds.add(*op, at.resolve(now_ns));
            Ok(None)
        }
        Cond::And(a, b) => {
            let a = split(a, now_ns, bounds)?;
            let b = split(b, now_ns, bounds)?;
            Ok(match (a, b) {
                (Some(a), Some(b)) => Some(Cond::And(Box::new(a), Box::new(b))),
                (a, b) => a.or(b),
            })
        }
        other if mentions_time(other) => Err(InfluxqlError::Unsupported {
            pos: 0,
            what: "time conditions inside OR (AND them with the rest)".into(),
        }),
        other => Ok(Some(other.clone())),
    }
}

/// A compiled tag condition.
#[derive(Debug)]
pub enum TagCond {
    /// Both hold.
    And(Box<TagCond>, Box<TagCond>),
    /// Either holds.
    Or(Box<TagCond>, Box<TagCond>),
    /// The tag's value (empty when absent) equals (or, negated, differs from) `value`.
    Eq {
        /// Tag key.
        key: String,
        /// Compared value.
        value: String,
        /// `!=`
        negate: bool,
    },
    /// The tag's value matches (or, negated, does not match) the expression.
    Regex {
        /// Tag key.
        key: String,
        /// Compiled pattern.
        regex: Regex,
        /// `!~`
        negate: bool,
    },
}

/// Compile a regular expression from a query, bounded in length and compiled size.
pub fn compile_regex(pattern: &str) -> Result<Regex, InfluxqlError> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(InfluxqlError::Invalid(format!(
            "regular expression longer than {MAX_REGEX_LEN} bytes"
        )));
    }
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| {
            let first = e.to_string();
            let first = first.lines().last().unwrap_or("invalid");
            InfluxqlError::Invalid(format!("invalid regular expression /{pattern}/: {first}"))
        })
}

/// Compile the non-time part of a condition. `is_field` tells keys that name a field
/// (a metric) and no tag: fluxgate filters on tags only.
pub fn compile(c: &Cond, is_field: &dyn Fn(&str) -> bool) -> Result<TagCond, InfluxqlError> {
    let field_refused = |key: &str| InfluxqlError::Unsupported {
        pos: 0,
        what: format!(
            "conditions on fields (\"{key}\" is a field; filter on tags such as \"device\")"
        ),
    };
    Ok(match c {
        Cond::And(a, b) => TagCond::And(
            Box::new(compile(a, is_field)?),
            Box::new(compile(b, is_field)?),
        ),
        Cond::Or(a, b) => TagCond::Or(
            Box::new(compile(a, is_field)?),
            Box::new(compile(b, is_field)?),
        ),
        Cond::Compare { key, negate, value } => {
            if is_field(key) {
                return Err(field_refused(key));
            }
            let value = match value {
                Literal::Str(s) => s.clone(),
                Literal::Number(_) | Literal::Bool(_) => {
                    return Err(InfluxqlError::Invalid(format!(
                        "tag \"{key}\" can only be compared with a 'string'"
                    )));
                }
            };
            TagCond::Eq {
                key: key.clone(),
                value,
                negate: *negate,
            }
        }
        Cond::Regex {
            key,
            negate,
            pattern,
        } => {
            if is_field(key) {
                return Err(field_refused(key));
            }
            TagCond::Regex {
                key: key.clone(),
                regex: compile_regex(pattern)?,
                negate: *negate,
            }
        }
        Cond::Ordered { key, op } => {
            return Err(InfluxqlError::Unsupported {
                pos: 0,
                what: format!(
                    "the comparison \"{key}\" {op} (on fields; tags compare with =, !=, =~, !~)"
                ),
            });
        }
        Cond::Time { .. } => {
            return Err(InfluxqlError::Unsupported {
                pos: 0,
                what: "time conditions here".into(),
            });
        }
    })
}

impl TagCond {
    /// Whether a series with these tags matches; `tag(key)` is "" for a missing tag.
    pub fn matches(&self, tag: &dyn Fn(&str) -> String) -> bool {
        match self {
            TagCond::And(a, b) => a.matches(tag) && b.matches(tag),
            TagCond::Or(a, b) => a.matches(tag) || b.matches(tag),
            TagCond::Eq { key, value, negate } => (tag(key) == *value) != *negate,
            TagCond::Regex { key, regex, negate } => regex.is_match(&tag(key)) != *negate,
        }
    }
}

/// `GROUP BY time` buckets in ms: width and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    /// Width, ms (> 0).
    pub every_ms: i64,
    /// Boundary shift, ms.
    pub offset_ms: i64,
}

impl Buckets {
    /// From a `time(..)` dimension; the store keeps ms, so finer intervals are refused.
    pub fn new(i: Interval) -> Result<Buckets, InfluxqlError> {
        if i.every_ns % NS_PER_MS != 0 || i.offset_ns % NS_PER_MS != 0 {
            return Err(InfluxqlError::Unsupported {
                pos: 0,
                what: "GROUP BY time() intervals or offsets finer than 1ms (the store keeps milliseconds)".into(),
            });
        }
        Ok(Buckets {
            every_ms: i.every_ns / NS_PER_MS,
            offset_ms: (i.offset_ns / NS_PER_MS).rem_euclid(i.every_ns / NS_PER_MS),
        })
    }

    /// The start of the bucket holding `ts` (aligned to the epoch plus the offset).
    pub fn start(self, ts: i64) -> i64 {
        ts.saturating_sub(ts.saturating_sub(self.offset_ms).rem_euclid(self.every_ms))
    }
}

/// Running state of one aggregate over points in time order.
#[derive(Debug, Clone)]
pub struct Acc {
    func: Func,
    count: i64,
    int_sum: Option<i64>,
    float_sum: f64,
    numeric: i64,
    all_int: bool,
    /// The selected point (min, max, first, last) and its time.
    pick: Option<(i64, Value)>,
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::F64(f) => Some(*f),
        Value::I64(i) => Some(*i as f64),
        _ => None,
    }
}

impl Acc {
    /// An empty accumulator for `func`.
    pub fn new(func: Func) -> Acc {
        Acc {
            func,
            count: 0,
            int_sum: Some(0),
            float_sum: 0.0,
            numeric: 0,
            all_int: true,
            pick: None,
        }
    }

    /// Add the next point (points come in time order).
    pub fn add(&mut self, ts: i64, v: &Value) {
        self.count += 1;
        let n = number(v);
        if let Some(x) = n {
            self.numeric += 1;
            self.float_sum += x;
            match v {
                Value::I64(i) => self.int_sum = self.int_sum.and_then(|s| s.checked_add(*i)),
                _ => self.all_int = false,
            }
        }
        let replace = match (&self.pick, self.func) {
            (None, Func::First | Func::Last) => true,
            (None, Func::Min | Func::Max) => n.is_some(),
            (Some(_), Func::Last) => true,
            (Some((_, cur)), Func::Min) => match (n, number(cur)) {
                (Some(x), Some(c)) => x < c,
                _ => false,
            },
            (Some((_, cur)), Func::Max) => match (n, number(cur)) {
                (Some(x), Some(c)) => x > c,
                _ => false,
            },
            _ => false,
        };
        if replace {
            self.pick = Some((ts, v.clone()));
        }
    }

    /// The aggregate's value and, for selectors, the time of the selected point; `None`
    /// when the bucket had nothing to aggregate.
    pub fn finish(&self) -> Option<(Cell, Option<i64>)> {
        match self.func {
            Func::Count => (self.count > 0).then_some((Cell::Int(self.count), None)),
            Func::Mean => (self.numeric > 0)
                .then(|| (Cell::Float(self.float_sum / self.numeric as f64), None)),
            Func::Sum => {
                if self.numeric == 0 {
                    return None;
                }
                match (self.all_int, self.int_sum) {
                    (true, Some(s)) => Some((Cell::Int(s), None)),
                    _ => Some((Cell::Float(self.float_sum), None)),
                }
            }
            Func::Min | Func::Max | Func::First | Func::Last => {
                let (ts, v) = self.pick.as_ref()?;
                // A mixed-type (integer and float) series reports floats, as a bucket
                // that mixes them would.
                let cell = match v {
                    Value::I64(i) if !self.all_int => Cell::Float(*i as f64),
                    v => value_cell(v),
                };
                Some((cell, Some(*ts)))
            }
        }
    }
}

/// A stored value as an answer cell.
pub fn value_cell(v: &Value) -> Cell {
    match v {
        Value::F64(f) => Cell::Float(*f),
        Value::I64(i) => Cell::Int(*i),
        Value::Bool(b) => Cell::Bool(*b),
        Value::Str(s) => Cell::Str(s.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::influxql::ast::Statement;
    use crate::influxql::parser::parse;

    fn cond(q: &str) -> Cond {
        match parse(&format!("SELECT v FROM m WHERE {q}"))
            .expect("parses")
            .remove(0)
        {
            Statement::Select(s) => s.cond.expect("cond"),
            _ => unreachable!(),
        }
    }

    #[test]
    fn time_bounds_become_store_ranges() {
        let now = 10_000_000_000;
        let (b, rest) =
            split_time(Some(&cond("time >= 1500000ns AND time <= now()")), now).expect("ok");
        assert_eq!(rest, None);
        // 1.5 ms rounds up to 2 ms; the inclusive end 10,000 ms becomes exclusive 10,001.
        assert_eq!(b.to_ms(), (2, 10_001));
        let (b, rest) = split_time(
            Some(&cond("device = 'a' AND time > 5ms AND time < 9ms")),
            now,
        )
        .expect("ok");
        assert!(matches!(rest, Some(Cond::Compare { .. })));
        assert_eq!(b.to_ms(), (6, 9));
        assert!(split_time(Some(&cond("device = 'a' OR time > 5ms")), now).is_err());
    }

    #[test]
    fn tag_conditions_match_like_influxdb() {
        let c = compile(
            &cond(r#"("device" =~ /^a/ OR site = 'x') AND floor != '2'"#),
            &|_| false,
        )
        .expect("ok");
        let tags = |d: &'static str, site: &'static str, floor: &'static str| {
            move |k: &str| match k {
                "device" => d.to_owned(),
                "site" => site.to_owned(),
                "floor" => floor.to_owned(),
                _ => String::new(),
            }
        };
        assert!(c.matches(&tags("ab", "", "")));
        assert!(c.matches(&tags("b", "x", "1")));
        assert!(!c.matches(&tags("b", "y", "1")));
        assert!(!c.matches(&tags("a", "x", "2")));
        assert!(compile(&cond("temp = 'x'"), &|k| k == "temp").is_err());
        assert!(compile(&cond("temp > 3"), &|_| false).is_err());
        assert!(compile(&cond("device =~ /(/"), &|_| false).is_err());
        // A pattern whose compiled program is huge is refused, not built.
        assert!(compile(&cond(r"device =~ /\w{1000}\w{1000}\w{1000}/"), &|_| false).is_err());
    }

    #[test]
    fn buckets_align_to_the_epoch_plus_offset() {
        let b = Buckets::new(Interval {
            every_ns: 60_000_000_000,
            offset_ns: 0,
        })
        .expect("ok");
        assert_eq!(b.start(125_000), 120_000);
        assert_eq!(b.start(-1), -60_000);
        let b = Buckets::new(Interval {
            every_ns: 60_000_000_000,
            offset_ns: -15_000_000_000,
        })
        .expect("ok");
        assert_eq!(b.start(125_000), 105_000);
        assert!(
            Buckets::new(Interval {
                every_ns: 1_500,
                offset_ns: 0
            })
            .is_err()
        );
    }

    #[test]
    fn aggregates_keep_influxdb_types() {
        let run = |func, vals: &[Value]| {
            let mut a = Acc::new(func);
            for (i, v) in vals.iter().enumerate() {
                a.add(i as i64, v);
            }
            a.finish()
        };
        let ints = [Value::I64(3), Value::I64(1), Value::I64(3)];
        assert_eq!(run(Func::Mean, &ints), Some((Cell::Float(7.0 / 3.0), None)));
        assert_eq!(run(Func::Sum, &ints), Some((Cell::Int(7), None)));
        assert_eq!(run(Func::Count, &ints), Some((Cell::Int(3), None)));
        // Ties select the earliest point.
        assert_eq!(run(Func::Max, &ints), Some((Cell::Int(3), Some(0))));
        assert_eq!(run(Func::Min, &ints), Some((Cell::Int(1), Some(1))));
        assert_eq!(run(Func::First, &ints), Some((Cell::Int(3), Some(0))));
        assert_eq!(run(Func::Last, &ints), Some((Cell::Int(3), Some(2))));
        assert_eq!(run(Func::Mean, &[]), None);
        assert_eq!(run(Func::Mean, &[Value::Str("x".into())]), None);
        assert_eq!(
            run(Func::Last, &[Value::Str("x".into())]),
            Some((Cell::Str("x".into()), Some(0)))
        );
        assert_eq!(
            run(Func::Sum, &[Value::I64(i64::MAX), Value::I64(1)]),
            Some((Cell::Float(i64::MAX as f64 + 1.0), None))
        );
    }
}
