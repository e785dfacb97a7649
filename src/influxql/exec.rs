//! Answering parsed statements from the embedded store and the registry's labels.
//!
//! Reads stay within the store's query limits, the same ones the REST history API runs
//! under: every store read takes one of `store.max_concurrent_queries` slots, a
//! statement decodes at most `store.max_decode_points` points in all (over every series
//! it reads), and answers at most `store.max_query_points` rows; `GROUP BY time` may not
//! make more buckets than that either. Over a limit the statement gets an error naming
//! the limit, never a partial answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::InfluxqlError;
use super::ast::{FieldExpr, Fill, Func, Measurement, NameFilter, Select, Statement};
use super::encode::{Cell, Series};
use super::plan::{self, Acc, Buckets};
use crate::model::Value;
use crate::store::{RangeQuery, StoreError, StoreReader};

/// Looks up a device's labels (the registry, in the gateway).
pub type LabelLookup = Arc<dyn Fn(&str) -> Vec<(String, String)> + Send + Sync>;

/// What statements are answered from.
#[derive(Clone)]
pub struct Source {
    /// The embedded store (`None` when it is disabled).
    pub store: Option<StoreReader>,
    /// Device labels, which become tags.
    pub labels: LabelLookup,
    /// The measurement name (the sink's `measurement`).
    pub measurement: String,
    /// The one database's name.
    pub database: String,
    /// Most rows one statement answers (`store.max_query_points`).
    pub max_rows: usize,
}

/// A device and its tags.
#[derive(Debug, Clone)]
struct Device {
    id: String,
    labels: BTreeMap<String, String>,
}

impl Device {
    fn tag(&self, key: &str) -> String {
        if key == "device" {
            self.id.clone()
        } else {
            self.labels.get(key).cloned().unwrap_or_default()
        }
    }
}

/// The schema as InfluxDB would see it: the devices (with their tags) and metrics of
/// every stored series. Loaded once per query, shared by its statements.
pub struct Catalog {
    devices: Vec<Device>,
    /// Metrics per device index.
    metrics: Vec<BTreeSet<String>>,
    fields: BTreeSet<String>,
    tag_keys: BTreeSet<String>,
}

impl Catalog {
    /// Read the series list and the devices' labels.
    pub async fn load(src: &Source) -> Result<Catalog, InfluxqlError> {
        let store = src.store.as_ref().ok_or(InfluxqlError::NoStore)?;
        let series = store.series().await.map_err(store_error)?;
        let mut devices: Vec<Device> = Vec::new();
        let mut metrics: Vec<BTreeSet<String>> = Vec::new();
        let mut fields = BTreeSet::new();
        let mut tag_keys = BTreeSet::from(["device".to_owned()]);
        for (device, metric) in series {
            if devices.last().is_none_or(|d| d.id != device) {
                let labels: BTreeMap<String, String> = (src.labels)(&device)
                    .into_iter()
                    .filter(|(k, _)| k != "device" && k != "time")
                    .collect();
                tag_keys.extend(labels.keys().cloned());
                devices.push(Device { id: device, labels });
                metrics.push(BTreeSet::new());
            }
            fields.insert(metric.clone());
            if let Some(m) = metrics.last_mut() {
                m.insert(metric);
            }
        }
        Ok(Catalog {
            devices,
            metrics,
            fields,
            tag_keys,
        })
    }

    fn is_field(&self, key: &str) -> bool {
        self.fields.contains(key) && !self.tag_keys.contains(key)
    }
}

fn store_error(e: StoreError) -> InfluxqlError {
    match e {
        StoreError::Busy => InfluxqlError::Busy,
        StoreError::DecodeBudget { max } => InfluxqlError::TooLarge(format!(
            "one answer needs more than {max} stored points (store.max_decode_points); narrow the time range"
        )),
        e => {
            tracing::error!(error = %e, "InfluxQL store read failed");
            InfluxqlError::Internal
        }
    }
}

/// Whether the statement's `FROM` names our measurement (another one simply has no
/// data, as in InfluxDB); an unknown database or retention policy is an error.
fn from_ours(from: Option<&Measurement>, src: &Source) -> Result<bool, InfluxqlError> {
    let Some(m) = from else { return Ok(true) };
    if let Some(db) = &m.database
        && *db != src.database
    {
        return Err(InfluxqlError::Invalid(format!("database not found: {db}")));
    }
    if let Some(rp) = &m.retention_policy
        && rp != "autogen"
    {
        return Err(InfluxqlError::Invalid(format!(
            "retention policy not found: {rp}"
        )));
    }
    Ok(m.name == src.measurement)
}

fn name_matches(filter: &NameFilter, name: &str) -> Result<bool, InfluxqlError> {
    Ok(match filter {
        NameFilter::Eq(n) => n == name,
        NameFilter::Ne(n) => n != name,
        NameFilter::In(list) => list.iter().any(|n| n == name),
        NameFilter::Regex { pattern, negate } => {
            plan::compile_regex(pattern)?.is_match(name) != *negate
        }
    })
}

/// A SHOW answer: one series with `columns`, or no series at all when nothing matched
/// (InfluxDB omits the series rather than sending it empty).
fn listing(
    name: Option<&str>,
    columns: &[&str],
    rows: impl IntoIterator<Item = Vec<Cell>>,
) -> Vec<Series> {
    let values: Vec<Vec<Cell>> = rows.into_iter().collect();
    if values.is_empty() {
        return Vec::new();
    }
    vec![Series {
        name: name.map(str::to_owned),
        tags: Vec::new(),
        columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        values,
    }]
}

fn take<T>(items: impl Iterator<Item = T>, limit: Option<usize>) -> Vec<T> {
    items.take(limit.unwrap_or(usize::MAX)).collect()
}

/// Answer one statement. `catalog` is `None` when the store is disabled (only the
/// statements that need no data can then be answered).
pub async fn execute(
    stmt: &Statement,
    src: &Source,
    catalog: Option<&Catalog>,
    now_ns: i64,
) -> Result<Vec<Series>, InfluxqlError> {
    match stmt {
        Statement::ShowDatabases => Ok(listing(
            Some("databases"),
            &["name"],
            [vec![Cell::Str(src.database.clone())]],
        )),
        Statement::ShowRetentionPolicies => Ok(vec![Series {
            name: None,
            tags: Vec::new(),
            columns: [
                "name",
                "duration",
                "shardGroupDuration",
                "replicaN",
                "default",
            ]
            .map(str::to_owned)
            .to_vec(),
            values: vec![vec![
                Cell::Str("autogen".into()),
                Cell::Str("0s".into()),
                Cell::Str("168h0m0s".into()),
                Cell::Int(1),
                Cell::Bool(true),
            ]],
        }]),
        Statement::ShowMeasurements { filter, limit } => {
            let catalog = catalog.ok_or(InfluxqlError::NoStore)?;
            let listed = !catalog.devices.is_empty()
                && match filter {
                    Some(f) => name_matches(f, &src.measurement)?,
                    None => true,
                };
            let rows = listed.then(|| vec![Cell::Str(src.measurement.clone())]);
            Ok(listing(
                Some("measurements"),
                &["name"],
                take(rows.into_iter(), *limit),
            ))
        }
        Statement::ShowTagKeys { from, limit } => {
            let catalog = catalog.ok_or(InfluxqlError::NoStore)?;
            if !from_ours(from.as_ref(), src)? || catalog.devices.is_empty() {
                return Ok(Vec::new());
            }
            let rows = catalog.tag_keys.iter().map(|k| vec![Cell::Str(k.clone())]);
            Ok(listing(
                Some(&src.measurement),
                &["tagKey"],
                take(rows, *limit),
            ))
        }
        Statement::ShowFieldKeys { from, limit } => {
            let catalog = catalog.ok_or(InfluxqlError::NoStore)?;
            if !from_ours(from.as_ref(), src)? {
                return Ok(Vec::new());
            }
            let types = field_types(src, catalog).await?;
            let rows = catalog.fields.iter().map(|f| {
                let t = types.get(f).copied().unwrap_or("float");
                vec![Cell::Str(f.clone()), Cell::Str(t.to_owned())]
            });
            Ok(listing(
                Some(&src.measurement),
                &["fieldKey", "fieldType"],
                take(rows, *limit),
            ))
        }
        Statement::ShowTagValues {
            from,
            keys,
            cond,
            limit,
        } => {
            let catalog = catalog.ok_or(InfluxqlError::NoStore)?;
            if !from_ours(from.as_ref(), src)? {
                return Ok(Vec::new());
            }
            let (bounds, rest) = plan::split_time(cond.as_ref(), now_ns)?;
            if bounds != plan::TimeBounds::default() {
                return Err(InfluxqlError::Unsupported {
                    pos: 0,
                    what: "time conditions in SHOW TAG VALUES".into(),
                });
            }
            let filter = rest
                .map(|c| plan::compile(&c, &|k| catalog.is_field(k)))
                .transpose()?;
            let mut pairs: BTreeSet<(String, String)> = BTreeSet::new();
            for key in &catalog.tag_keys {
                if !name_matches(keys, key)? {
                    continue;
                }
                for d in &catalog.devices {
                    if filter.as_ref().is_some_and(|f| !f.matches(&|k| d.tag(k))) {
                        continue;
                    }
                    let v = d.tag(key);
                    if !v.is_empty() {
                        pairs.insert((key.clone(), v));
                    }
                }
            }
            let rows = pairs
                .into_iter()
                .map(|(k, v)| vec![Cell::Str(k), Cell::Str(v)]);
            Ok(listing(
                Some(&src.measurement),
                &["key", "value"],
                take(rows, *limit),
            ))
        }
        Statement::Select(s) => {
            let catalog = catalog.ok_or(InfluxqlError::NoStore)?;
            select(s, src, catalog, now_ns).await
        }
    }
}

/// The type of each metric, as InfluxDB names it, from the latest value of one device
/// that has it (one chunk read per device asked).
async fn field_types(
    src: &Source,
    catalog: &Catalog,
) -> Result<HashMap<String, &'static str>, InfluxqlError> {
    let store = src.store.as_ref().ok_or(InfluxqlError::NoStore)?;
    let mut types: HashMap<String, &'static str> = HashMap::new();
    for (device, metrics) in catalog.devices.iter().zip(&catalog.metrics) {
        if metrics.iter().all(|m| types.contains_key(m)) {
            continue;
        }
        for latest in store.latest(device.id.clone()).await.map_err(store_error)? {
            let t = match latest.value {
                Value::F64(_) => "float",
                Value::I64(_) => "integer",
                Value::Bool(_) => "boolean",
                Value::Str(_) => "string",
            };
            types.entry(latest.metric).or_insert(t);
        }
        if types.len() == catalog.fields.len() {
            break;
        }
    }
    Ok(types)
}

/// Column names: the alias, else the field or function name; repeated names get `_1`,
/// `_2`, ... as in InfluxDB.
fn column_names(s: &Select) -> Vec<String> {
    let mut used: Vec<String> = vec!["time".into()];
    for f in &s.fields {
        let base = match (&f.alias, &f.expr) {
            (Some(a), _) => a.clone(),
            (None, FieldExpr::Raw(name)) => name.clone(),
            (None, FieldExpr::Call { func, .. }) => func.name().to_owned(),
        };
        let mut name = base.clone();
        let mut n = 1;
        while used[1..].contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        used.push(name);
    }
    used
}

fn field_of(e: &FieldExpr) -> &str {
    match e {
        FieldExpr::Raw(f) | FieldExpr::Call { field: f, .. } => f,
    }
}

type Points = Arc<Vec<(i64, Value)>>;

/// Reads series within the statement's decode budget, each at most once.
struct Reader<'a> {
    store: &'a StoreReader,
    range: (i64, i64),
    budget: usize,
    /// Most points any series can contribute to the answer (raw, oldest-first queries
    /// with a LIMIT need no more than `OFFSET + LIMIT` per series); reading stops there.
    cap: Option<usize>,
    cache: HashMap<(usize, String), Points>,
}

impl Reader<'_> {
    async fn points(
        &mut self,
        dev: usize,
        device: &str,
        field: &str,
    ) -> Result<Points, InfluxqlError> {
        if let Some(p) = self.cache.get(&(dev, field.to_owned())) {
            return Ok(p.clone());
        }
        let max = self.store.limits().max_decode_points;
        let page = self
            .store
            .range(RangeQuery {
                device: device.to_owned(),
                metric: field.to_owned(),
                from_ms: self.range.0,
                to_ms: self.range.1,
                step: None,
                limit: self
                    .cap
                    .map_or(usize::MAX, |c| c)
                    .min(self.budget.saturating_add(1)),
            })
            .await
            .map_err(store_error)?;
        let capped = self.cap.is_some_and(|c| page.points.len() >= c);
        if (page.next_from.is_some() && !capped) || page.points.len() > self.budget {
            return Err(InfluxqlError::TooLarge(format!(
                "this statement reads more than {max} stored points (store.max_decode_points); \
                 narrow the time range or select fewer devices"
            )));
        }
        self.budget -= page.points.len();
        let pts: Points = Arc::new(
            page.points
                .into_iter()
                .map(|p| (p.ts_ms, p.value))
                .collect(),
        );
        self.cache.insert((dev, field.to_owned()), pts.clone());
        Ok(pts)
    }
}

async fn select(
    s: &Select,
    src: &Source,
    catalog: &Catalog,
    now_ns: i64,
) -> Result<Vec<Series>, InfluxqlError> {
    let calls = s
        .fields
        .iter()
        .filter(|f| matches!(f.expr, FieldExpr::Call { .. }))
        .count();
    if calls != 0 && calls != s.fields.len() {
        return Err(InfluxqlError::Invalid(
            "mixing aggregate and non-aggregate queries is not supported".into(),
        ));
    }
    let aggregate = calls > 0;
    if !aggregate && s.interval.is_some() {
        return Err(InfluxqlError::Invalid(
            "GROUP BY requires at least one aggregate function".into(),
        ));
    }
    if !from_ours(Some(&s.from), src)? {
        return Ok(Vec::new());
    }
    let buckets = s.interval.map(Buckets::new).transpose()?;
    let (mut bounds, rest) = plan::split_time(s.cond.as_ref(), now_ns)?;
    if buckets.is_some() {
        if bounds.lo_ns.is_none() {
            return Err(InfluxqlError::Invalid(
                "aggregate functions with GROUP BY time require a WHERE time clause with a lower limit"
                    .into(),
            ));
        }
        // As in InfluxDB, an open end means now.
        bounds.hi_ns.get_or_insert(now_ns);
    }
    let (from_ms, to_ms) = bounds.to_ms();
    if from_ms >= to_ms {
        return Ok(Vec::new());
    }
    let filter = rest
        .map(|c| plan::compile(&c, &|k| catalog.is_field(k)))
        .transpose()?;
    let max_rows = src.max_rows;
    // Bucket count first: cheap to know, and it bounds what the answer can hold.
    let bucket_span = match buckets {
        Some(b) => {
            let (first, last) = (b.start(from_ms), b.start(to_ms - 1));
            let n = (last - first) / b.every_ms + 1;
            if usize::try_from(n).map_or(true, |n| n > max_rows) {
                return Err(InfluxqlError::TooLarge(format!(
                    "GROUP BY time() makes {n} buckets, more than {max_rows} (store.max_query_points); use a larger interval"
                )));
            }
            Some((b, first, n))
        }
        None => None,
    };

    // Group the matching devices by the GROUP BY tags (sorted by key, as InfluxDB
    // writes them); groups come out sorted by their tag values.
    let mut group_keys: Vec<String> = if s.group_all_tags {
        catalog.tag_keys.iter().cloned().collect()
    } else {
        s.group_tags.clone()
    };
    group_keys.sort();
    group_keys.dedup();
    let wanted: BTreeSet<&str> = s.fields.iter().map(|f| field_of(&f.expr)).collect();
    let mut groups: BTreeMap<Vec<String>, Vec<usize>> = BTreeMap::new();
    for (i, d) in catalog.devices.iter().enumerate() {
        if !wanted.iter().any(|f| catalog.metrics[i].contains(*f)) {
            continue;
        }
        if filter.as_ref().is_some_and(|f| !f.matches(&|k| d.tag(k))) {
            continue;
        }
        let key = group_keys.iter().map(|k| d.tag(k)).collect();
        groups.entry(key).or_default().push(i);
    }

    let Some(store) = src.store.as_ref() else {
        return Err(InfluxqlError::NoStore);
    };
    let mut reader = Reader {
        store,
        range: (from_ms, to_ms),
        budget: store.limits().max_decode_points,
        cap: match s.limit {
            Some(limit) if !aggregate && !s.descending => {
                Some(s.offset.saturating_add(limit).max(1))
            }
            _ => None,
        },
        cache: HashMap::new(),
    };
    let columns = column_names(s);
    let mut out = Vec::new();
    let mut rows_total = 0usize;
    // Newest first reverses the order of the series too, as in InfluxDB.
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = groups.into_iter().collect();
    if s.descending {
        groups.reverse();
    }
    for (values, devs) in groups
        .into_iter()
        .skip(s.soffset)
        .take(s.slimit.unwrap_or(usize::MAX))
    {
        // Per field, every point of the group's devices in (time, device) order.
        let mut per_field: Vec<Vec<(i64, usize, Value)>> = Vec::with_capacity(s.fields.len());
        for f in &s.fields {
            let field = field_of(&f.expr);
            let mut pts = Vec::new();
            for (pos, &dev) in devs.iter().enumerate() {
                if !catalog.metrics[dev].contains(field) {
                    continue;
                }
                let got = reader.points(dev, &catalog.devices[dev].id, field).await?;
                pts.extend(got.iter().map(|(ts, v)| (*ts, pos, v.clone())));
            }
            pts.sort_by_key(|p| (p.0, p.1));
            per_field.push(pts);
        }
        if per_field.iter().all(Vec::is_empty) {
            continue;
        }
        let mut rows = if !aggregate {
            raw_rows(&per_field)
        } else if let Some((b, first, n)) = bucket_span {
            bucket_rows(s, &per_field, b, first, n)
        } else {
            vec![whole_range_row(
                s,
                &per_field,
                bounds.lo_ns.map_or(0, |_| from_ms),
            )]
        };
        if s.descending {
            rows.reverse();
        }
        let rows: Vec<Vec<Cell>> = rows
            .into_iter()
            .skip(s.offset)
            .take(s.limit.unwrap_or(usize::MAX))
            .collect();
        if rows.is_empty() {
            continue;
        }
        rows_total += rows.len();
        if rows_total > max_rows {
            return Err(InfluxqlError::TooLarge(format!(
                "the answer has more than {max_rows} rows (store.max_query_points); narrow the time range, use a larger GROUP BY time() or a LIMIT"
            )));
        }
        out.push(Series {
            name: Some(src.measurement.clone()),
            tags: group_keys.iter().cloned().zip(values).collect(),
            columns: columns.clone(),
            values: rows,
        });
    }
    Ok(out)
}

/// Raw points: one row per (time, device), a column per selected field.
fn raw_rows(per_field: &[Vec<(i64, usize, Value)>]) -> Vec<Vec<Cell>> {
    let mut rows: BTreeMap<(i64, usize), Vec<Cell>> = BTreeMap::new();
    for (i, pts) in per_field.iter().enumerate() {
        for (ts, dev, v) in pts {
            let row = rows.entry((*ts, *dev)).or_insert_with(|| {
                let mut r = vec![Cell::Time(*ts)];
                r.resize(per_field.len() + 1, Cell::Null);
                r
            });
            row[i + 1] = plan::value_cell(v);
        }
    }
    rows.into_values().collect()
}

fn func_of(s: &Select, i: usize) -> Func {
    match s.fields[i].expr {
        FieldExpr::Call { func, .. } => func,
        // Raw fields never reach the aggregation paths.
        FieldExpr::Raw(_) => Func::Last,
    }
}

/// What an empty bucket of an aggregate shows under `fill`, before `previous` is applied.
fn empty_cell(fill: Fill, func: Func) -> Cell {
    match fill {
        Fill::Number(n) if n.fract() == 0.0 && n.abs() < 9e15 => Cell::Int(n as i64),
        Fill::Number(n) => Cell::Float(n),
        // InfluxDB counts an empty bucket as 0 rather than null.
        Fill::Null | Fill::None | Fill::Previous if func == Func::Count => Cell::Int(0),
        _ => Cell::Null,
    }
}

fn bucket_rows(
    s: &Select,
    per_field: &[Vec<(i64, usize, Value)>],
    b: Buckets,
    first: i64,
    n: i64,
) -> Vec<Vec<Cell>> {
    let n = usize::try_from(n).unwrap_or(0);
    let mut cols: Vec<Vec<Option<Cell>>> = Vec::with_capacity(per_field.len());
    for (i, pts) in per_field.iter().enumerate() {
        let mut col: Vec<Option<Cell>> = vec![None; n];
        let mut acc: Option<(usize, Acc)> = None;
        for (ts, _, v) in pts {
            let Ok(k) = usize::try_from((b.start(*ts) - first) / b.every_ms) else {
                continue;
            };
            if k >= n {
                continue;
            }
            if acc.as_ref().is_some_and(|(cur, _)| *cur != k)
                && let Some((cur, a)) = acc.take()
            {
                col[cur] = a.finish().map(|(c, _)| c);
            }
            acc.get_or_insert_with(|| (k, Acc::new(func_of(s, i))))
                .1
                .add(*ts, v);
        }
        if let Some((cur, a)) = acc {
            col[cur] = a.finish().map(|(c, _)| c);
        }
        cols.push(col);
    }
    let mut previous: Vec<Cell> = vec![Cell::Null; cols.len()];
    let mut rows = Vec::with_capacity(n);
    for k in 0..n {
        if s.fill == Fill::None && cols.iter().all(|c| c[k].is_none()) {
            continue;
        }
        let mut row = vec![Cell::Time(first + k as i64 * b.every_ms)];
        for (i, col) in cols.iter().enumerate() {
            let cell = match &col[k] {
                Some(c) => {
                    previous[i] = c.clone();
                    c.clone()
                }
                None if s.fill == Fill::Previous => previous[i].clone(),
                None => empty_cell(s.fill, func_of(s, i)),
            };
            row.push(cell);
        }
        rows.push(row);
    }
    rows
}

/// Aggregates over the whole range: one row. Its time is the selected point's when the
/// statement has a single selector, else the start of the range (0 when open).
fn whole_range_row(
    s: &Select,
    per_field: &[Vec<(i64, usize, Value)>],
    range_start: i64,
) -> Vec<Cell> {
    let mut cells = Vec::with_capacity(per_field.len());
    let mut picked = None;
    for (i, pts) in per_field.iter().enumerate() {
        let func = func_of(s, i);
        let mut acc = Acc::new(func);
        for (ts, _, v) in pts {
            acc.add(*ts, v);
        }
        match acc.finish() {
            Some((c, ts)) => {
                picked = ts;
                cells.push(c);
            }
            None => cells.push(empty_cell(s.fill, func)),
        }
    }
    let single_selector = s.fields.len() == 1 && func_of(s, 0).is_selector();
    let time = match (single_selector, picked) {
        (true, Some(ts)) => ts,
        _ => range_start,
    };
    let mut row = vec![Cell::Time(time)];
    row.extend(cells);
    row
}
