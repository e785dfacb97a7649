//! InfluxDB 1.x's JSON answer: `{"results": [{"statement_id": n, "series": [{"name",
//! "tags", "columns", "values"}]}]}`, an `"error"` in place of `"series"` for a statement
//! that failed, and `{"error": "..."}` alone for a query that does not parse. Times are
//! RFC 3339 strings (trailing zeros of the fraction trimmed, as Go's `RFC3339Nano`), or
//! integers in the unit the `epoch` parameter names.

use serde_json::{Map, Value as Json, json};

use super::InfluxqlError;

/// One value of an answer row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// No value.
    Null,
    /// A time, ms since the epoch (the store's precision).
    Time(i64),
    /// A float.
    Float(f64),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
}

/// One series of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its name (the measurement, or `databases`, ...); `None` for nameless answers.
    pub name: Option<String>,
    /// The `GROUP BY` tags (sorted by key); empty for none.
    pub tags: Vec<(String, String)>,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub values: Vec<Vec<Cell>>,
}

/// The unit of integer times (`epoch=`); `None` of it means RFC 3339 strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epoch {
    /// `ns`
    Ns,
    /// `u` or `µ`
    Us,
    /// `ms`
    Ms,
    /// `s`
    S,
    /// `m`
    M,
    /// `h`
    H,
}

impl Epoch {
    /// Parse the `epoch` parameter.
    pub fn parse(s: &str) -> Option<Epoch> {
        Some(match s {
            "ns" | "n" => Epoch::Ns,
            "u" | "µ" | "us" => Epoch::Us,
            "ms" => Epoch::Ms,
            "s" => Epoch::S,
            "m" => Epoch::M,
            "h" => Epoch::H,
            _ => return None,
        })
    }

    fn convert(self, ms: i64) -> i64 {
        match self {
            Epoch::Ns => ms.saturating_mul(1_000_000),
            Epoch::Us => ms.saturating_mul(1_000),
            Epoch::Ms => ms,
            Epoch::S => ms / 1_000,
            Epoch::M => ms / 60_000,
            Epoch::H => ms / 3_600_000,
        }
    }
}

/// A time in ms as Go's `RFC3339Nano` writes it (UTC, fraction without trailing zeros).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1_000);
    let frac = ms.rem_euclid(1_000);
    let Ok(secs) = u64::try_from(secs) else {
        // Before 1970: the store cannot hold such times; show the epoch rather than fail.
        return "1970-01-01T00:00:00Z".to_owned();
    };
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let whole = humantime::format_rfc3339_seconds(t).to_string();
    if frac == 0 {
        return whole;
    }
    let digits = format!("{frac:03}");
    let digits = digits.trim_end_matches('0');
    format!("{}.{digits}Z", whole.trim_end_matches('Z'))
}

fn cell(c: &Cell, epoch: Option<Epoch>) -> Json {
    match c {
        Cell::Null => Json::Null,
        Cell::Time(ms) => match epoch {
            Some(e) => json!(e.convert(*ms)),
            None => json!(rfc3339(*ms)),
        },
        Cell::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Cell::Int(i) => json!(i),
        Cell::Bool(b) => json!(b),
        Cell::Str(s) => json!(s),
    }
}

fn series(s: &Series, epoch: Option<Epoch>) -> Json {
    let mut m = Map::new();
    if let Some(name) = &s.name {
        m.insert("name".into(), json!(name));
    }
    if !s.tags.is_empty() {
        let tags: Map<String, Json> = s.tags.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        m.insert("tags".into(), Json::Object(tags));
    }
    m.insert("columns".into(), json!(s.columns));
    let rows: Vec<Json> = s
        .values
        .iter()
        .map(|row| Json::Array(row.iter().map(|c| cell(c, epoch)).collect()))
        .collect();
    m.insert("values".into(), Json::Array(rows));
    Json::Object(m)
}

/// The answer to a query whose statements ran (each to series or to an error).
pub fn results(
    statements: &[Result<Vec<Series>, InfluxqlError>],
    epoch: Option<Epoch>,
    text: &str,
) -> Json {
    let results: Vec<Json> = statements
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut m = Map::new();
            m.insert("statement_id".into(), json!(i));
            match r {
                Ok(list) if list.is_empty() => {}
                Ok(list) => {
                    m.insert(
                        "series".into(),
                        Json::Array(list.iter().map(|s| series(s, epoch)).collect()),
                    );
                }
                Err(e) => {
                    m.insert("error".into(), json!(e.message(text)));
                }
            }
            Json::Object(m)
        })
        .collect();
    json!({ "results": results })
}

/// The answer to a request that failed as a whole (a parse error, bad credentials).
pub fn error(message: &str) -> Json {
    json!({ "error": message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_like_influxdb() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_120), "2023-11-14T22:13:20.12Z");
        assert_eq!(rfc3339(1_700_000_000_001), "2023-11-14T22:13:20.001Z");
        assert_eq!(Epoch::S.convert(1_999), 1);
        assert_eq!(Epoch::Ns.convert(2), 2_000_000);
    }

    #[test]
    fn answers_have_influxdb_shape() {
        let ok = Series {
            name: Some("telemetry".into()),
            tags: vec![("device".into(), "d1".into())],
            columns: vec!["time".into(), "mean".into()],
            values: vec![
                vec![Cell::Time(1_000), Cell::Float(1.5)],
                vec![Cell::Time(2_000), Cell::Null],
            ],
        };
        let text = "SELECT 1";
        let got = results(
            &[
                Ok(vec![ok]),
                Ok(vec![]),
                Err(InfluxqlError::Invalid("no".into())),
            ],
            Some(Epoch::Ms),
            text,
        );
        assert_eq!(
            got,
            json!({"results": [
                {"statement_id": 0, "series": [{"name": "telemetry", "tags": {"device": "d1"},
                  "columns": ["time", "mean"], "values": [[1000, 1.5], [2000, null]]}]},
                {"statement_id": 1},
                {"statement_id": 2, "error": "no"},
            ]})
        );
    }
}
