//! A recursive-descent parser for the InfluxQL subset fluxgate answers (see the module
//! docs of [`super`] for the grammar). Anything outside the subset is an error that names
//! the unsupported part, so a dashboard never gets a silently different answer.
//!
//! Untrusted input: nesting is bounded ([`MAX_DEPTH`] parentheses), as are the number of
//! statements and of select fields, so no query can exhaust the stack or allocate without
//! bound; the parser never panics.

use super::InfluxqlError;
use super::ast::*;
use super::lexer::{Tok, Token, tokenize};

/// Deepest nesting of parentheses in a condition.
pub const MAX_DEPTH: usize = 32;
/// Most statements in one query.
pub const MAX_STATEMENTS: usize = 32;
/// Most entries in one select list.
pub const MAX_FIELDS: usize = 64;

/// Parse a query text into its statements.
pub fn parse(text: &str) -> Result<Vec<Statement>, InfluxqlError> {
    let tokens = tokenize(text)?;
    let mut p = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let mut out = Vec::new();
    loop {
        while p.eat(&Tok::Semicolon) {}
        if p.peek() == &Tok::Eof {
            break;
        }
        if out.len() == MAX_STATEMENTS {
            return Err(p.unsupported(format!(
                "more than {MAX_STATEMENTS} statements in one query"
            )));
        }
        out.push(p.statement()?);
        if !p.eat(&Tok::Semicolon) && p.peek() != &Tok::Eof {
            return Err(p.expected("; or end of query"));
        }
    }
    if out.is_empty() {
        return Err(InfluxqlError::Parse {
            pos: 0,
            msg: "empty query".into(),
        });
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        // The token list always ends with Eof, which is never consumed past.
        self.tokens
            .get(self.at + ahead)
            .or(self.tokens.last())
            .map_or(&Tok::Eof, |t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.tokens
            .get(self.at)
            .or(self.tokens.last())
            .map_or(0, |t| t.pos)
    }

    fn next(&mut self) -> Tok {
        // Advancing past the end is harmless (peeks clamp to Eof) and keeps every
        // one-token step back below exact.
        let t = self.peek().clone();
        self.at += 1;
        t
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == t {
            self.next();
            true
        } else {
            false
        }
    }

    /// Whether the next token is the bare keyword `kw` (case-insensitive).
    fn at_keyword(&self, kw: &str) -> bool {
        self.keyword_at(0, kw)
    }

    fn keyword_at(&self, ahead: usize, kw: &str) -> bool {
        matches!(self.peek_at(ahead), Tok::Ident { name, quoted: false } if name.eq_ignore_ascii_case(kw))
    }

    fn eat_keyword(&mut self, kw: &str) -> bool {
        if self.at_keyword(kw) {
            self.next();
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<(), InfluxqlError> {
        if self.eat_keyword(kw) {
            Ok(())
        } else {
            Err(self.expected(kw))
        }
    }

    fn expect(&mut self, t: &Tok) -> Result<(), InfluxqlError> {
        if self.eat(t) {
            Ok(())
        } else {
            Err(self.expected(&t.describe()))
        }
    }

    fn expected(&self, what: &str) -> InfluxqlError {
        InfluxqlError::Parse {
            pos: self.pos(),
            msg: format!("found {}, expected {what}", self.peek().describe()),
        }
    }

    fn unsupported(&self, what: impl Into<String>) -> InfluxqlError {
        InfluxqlError::Unsupported {
            pos: self.pos(),
            what: what.into(),
        }
    }

    /// An identifier, bare or quoted.
    fn ident(&mut self, what: &str) -> Result<String, InfluxqlError> {
        match self.peek() {
            Tok::Ident { name, .. } => {
                let name = name.clone();
                self.next();
                Ok(name)
            }
            _ => Err(self.expected(what)),
        }
    }

    fn statement(&mut self) -> Result<Statement, InfluxqlError> {
        if self.eat_keyword("SELECT") {
            return self.select().map(Statement::Select);
        }
        if self.eat_keyword("SHOW") {
            return self.show();
        }
        match self.peek() {
            Tok::Ident {
                name,
                quoted: false,
            } => {
                let kw = name.to_ascii_uppercase();
                Err(self.unsupported(format!(
                    "{kw} statements (fluxgate's /query is read-only: SELECT and SHOW only)"
                )))
            }
            _ => Err(self.expected("SELECT or SHOW")),
        }
    }

    fn limit(&mut self) -> Result<Option<usize>, InfluxqlError> {
        let mut limit = None;
        if self.eat_keyword("LIMIT") {
            limit = Some(self.count("LIMIT")?);
        }
        if self.eat_keyword("OFFSET") {
            return Err(self.unsupported("OFFSET in SHOW statements"));
        }
        Ok(limit)
    }

    fn count(&mut self, what: &str) -> Result<usize, InfluxqlError> {
        match self.next() {
            Tok::Int(n) => usize::try_from(n).map_err(|_| self.expected(what)),
            _ => {
                self.at -= 1;
                Err(self.expected(&format!("a count after {what}")))
            }
        }
    }

    /// `ON db`, accepted and ignored (fluxgate has one database).
    fn on_database(&mut self) -> Result<(), InfluxqlError> {
        if self.eat_keyword("ON") {
            self.ident("a database name")?;
        }
        Ok(())
    }

    fn show(&mut self) -> Result<Statement, InfluxqlError> {
        if self.eat_keyword("DATABASES") {
            return Ok(Statement::ShowDatabases);
        }
        if self.eat_keyword("RETENTION") {
            self.expect_keyword("POLICIES")?;
            self.on_database()?;
            return Ok(Statement::ShowRetentionPolicies);
        }
        if self.eat_keyword("MEASUREMENTS") {
            self.on_database()?;
            let mut filter = None;
            if self.eat_keyword("WITH") {
                self.expect_keyword("MEASUREMENT")?;
                filter = Some(self.name_filter()?);
            }
            if self.at_keyword("WHERE") {
                return Err(self.unsupported("WHERE in SHOW MEASUREMENTS"));
            }
            let limit = self.limit()?;
            return Ok(Statement::ShowMeasurements { filter, limit });
        }
        if self.eat_keyword("FIELD") {
            self.expect_keyword("KEYS")?;
            self.on_database()?;
            let from = self.show_from()?;
            let limit = self.limit()?;
            return Ok(Statement::ShowFieldKeys { from, limit });
        }
        if self.eat_keyword("TAG") {
            if self.eat_keyword("KEYS") {
                self.on_database()?;
                let from = self.show_from()?;
                if self.at_keyword("WHERE") {
                    return Err(self.unsupported("WHERE in SHOW TAG KEYS"));
                }
                let limit = self.limit()?;
                return Ok(Statement::ShowTagKeys { from, limit });
            }
            self.expect_keyword("VALUES")?;
            self.on_database()?;
            let from = self.show_from()?;
            self.expect_keyword("WITH")?;
            self.expect_keyword("KEY")?;
            let keys = self.name_filter()?;
            let cond = if self.eat_keyword("WHERE") {
                Some(self.cond()?)
            } else {
                None
            };
            let limit = self.limit()?;
            return Ok(Statement::ShowTagValues {
                from,
                keys,
                cond,
                limit,
            });
        }
        match self.peek() {
            Tok::Ident {
                name,
                quoted: false,
            } => Err(self.unsupported(format!("SHOW {}", name.to_ascii_uppercase()))),
            _ => Err(self.expected("what to SHOW")),
        }
    }

    fn show_from(&mut self) -> Result<Option<Measurement>, InfluxqlError> {
        if self.eat_keyword("FROM") {
            Ok(Some(self.measurement()?))
        } else {
            Ok(None)
        }
    }

    /// `= name`, `!= name`, `=~ /re/`, `!~ /re/` or `IN (a, b, ...)`.
    fn name_filter(&mut self) -> Result<NameFilter, InfluxqlError> {
        match self.next() {
            Tok::Eq => Ok(NameFilter::Eq(self.ident("a name")?)),
            Tok::Ne => Ok(NameFilter::Ne(self.ident("a name")?)),
            op @ (Tok::EqRegex | Tok::NeRegex) => match self.next() {
                Tok::Regex(pattern) => Ok(NameFilter::Regex {
                    pattern,
                    negate: op == Tok::NeRegex,
                }),
                _ => {
                    self.at -= 1;
                    Err(self.expected("a regular expression"))
                }
            },
            Tok::Ident {
                name,
                quoted: false,
            } if name.eq_ignore_ascii_case("IN") => {
                self.expect(&Tok::LParen)?;
                let mut names = vec![self.ident("a name")?];
                while self.eat(&Tok::Comma) {
                    if names.len() == MAX_FIELDS {
                        return Err(self.unsupported(format!("more than {MAX_FIELDS} names in IN")));
                    }
                    names.push(self.ident("a name")?);
                }
                self.expect(&Tok::RParen)?;
                Ok(NameFilter::In(names))
            }
            _ => {
                self.at -= 1;
                Err(self.expected("=, !=, =~, !~ or IN"))
            }
        }
    }

    /// `m`, `rp.m` or `db.rp.m` (also `db..m`).
    fn measurement(&mut self) -> Result<Measurement, InfluxqlError> {
        if matches!(self.peek(), Tok::Regex(_) | Tok::Slash) {
            return Err(self.unsupported("a regular expression in FROM"));
        }
        let mut parts = vec![Some(self.ident("a measurement")?)];
        while self.eat(&Tok::Dot) {
            if parts.len() == 3 {
                return Err(self.expected("a measurement"));
            }
            if self.peek() == &Tok::Dot {
                parts.push(None);
                continue;
            }
            parts.push(Some(self.ident("a measurement")?));
        }
        if self.peek() == &Tok::Comma {
            return Err(self.unsupported("more than one measurement in FROM"));
        }
        let name = parts
            .pop()
            .flatten()
            .ok_or_else(|| self.expected("a measurement"))?;
        let retention_policy = parts.pop().flatten();
        let database = parts.pop().flatten();
        Ok(Measurement {
            database,
            retention_policy,
            name,
        })
    }

    fn select(&mut self) -> Result<Select, InfluxqlError> {
        let mut fields = vec![self.select_field()?];
        while self.eat(&Tok::Comma) {
            if fields.len() == MAX_FIELDS {
                return Err(self.unsupported(format!("more than {MAX_FIELDS} select fields")));
            }
            fields.push(self.select_field()?);
        }
        if self.at_keyword("INTO") {
            return Err(self.unsupported("SELECT INTO"));
        }
        self.expect_keyword("FROM")?;
        if self.eat(&Tok::LParen) {
            return Err(self.unsupported("subqueries"));
        }
        let from = self.measurement()?;
        let cond = if self.eat_keyword("WHERE") {
            Some(self.cond()?)
        } else {
            None
        };
        let mut select = Select {
            fields,
            from,
            cond,
            interval: None,
            group_tags: Vec::new(),
            group_all_tags: false,
            fill: Fill::Null,
            descending: false,
            limit: None,
            offset: 0,
            slimit: None,
            soffset: 0,
        };
        if self.eat_keyword("GROUP") {
            self.expect_keyword("BY")?;
            loop {
                self.dimension(&mut select)?;
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }
        if self.eat_keyword("FILL") {
            select.fill = self.fill()?;
        }
        if self.eat_keyword("ORDER") {
            self.expect_keyword("BY")?;
            if !self.at_keyword("time")
                && !matches!(self.peek(), Tok::Ident { name, quoted: true } if name == "time")
            {
                return Err(self.unsupported("ORDER BY anything but time"));
            }
            self.next();
            if self.eat_keyword("DESC") {
                select.descending = true;
            } else {
                self.eat_keyword("ASC");
            }
        }
        if self.eat_keyword("LIMIT") {
            select.limit = Some(self.count("LIMIT")?);
        }
        if self.eat_keyword("OFFSET") {
            select.offset = self.count("OFFSET")?;
        }
        if self.eat_keyword("SLIMIT") {
            select.slimit = Some(self.count("SLIMIT")?);
        }
        if self.eat_keyword("SOFFSET") {
            select.soffset = self.count("SOFFSET")?;
        }
        if self.at_keyword("tz") {
            return Err(self.unsupported("tz(): times are always UTC"));
        }
        Ok(select)
    }

    fn select_field(&mut self) -> Result<SelectField, InfluxqlError> {
        let expr = match self.peek().clone() {
            Tok::Star => return Err(self.unsupported("SELECT * (name the fields)")),
            Tok::Ident { name, quoted } => {
                self.next();
                if self.peek() == &Tok::LParen && !quoted {
                    let Some(func) = Func::parse(&name) else {
                        return Err(self.unsupported(format!(
                            "function {name}() (supported: mean, min, max, first, last, count, sum)"
                        )));
                    };
                    self.next();
                    if matches!(self.peek(), Tok::Star) {
                        return Err(
                            self.unsupported(format!("{}(*) (name the field)", func.name()))
                        );
                    }
                    if self.at_keyword("DISTINCT") {
                        return Err(self.unsupported("DISTINCT"));
                    }
                    if matches!(self.peek(), Tok::Regex(_) | Tok::Slash) {
                        return Err(self.unsupported("a regular expression as a function argument"));
                    }
                    let field = self.ident("a field name")?;
                    self.cast()?;
                    if self.peek() == &Tok::LParen {
                        return Err(self.unsupported("nested function calls"));
                    }
                    if self.peek() == &Tok::Comma {
                        return Err(self.unsupported(format!(
                            "{}() with more than one argument",
                            func.name()
                        )));
                    }
                    self.expect(&Tok::RParen)?;
                    FieldExpr::Call { func, field }
                } else {
                    self.cast()?;
                    FieldExpr::Raw(name)
                }
            }
            _ => return Err(self.expected("a field or function")),
        };
        if matches!(self.peek(), Tok::Plus | Tok::Minus | Tok::Star | Tok::Slash) {
            return Err(self.unsupported(format!(
                "arithmetic in the select list ({})",
                self.peek().describe()
            )));
        }
        let alias = if self.eat_keyword("AS") {
            Some(self.ident("an alias")?)
        } else {
            None
        };
        Ok(SelectField { expr, alias })
    }

    /// `::field`, `::tag`, `::float`, ...: accepted, and ignored (a key here is a field
    /// in a select list and a tag in a condition).
    fn cast(&mut self) -> Result<(), InfluxqlError> {
        if self.eat(&Tok::DoubleColon) {
            let kind = self.ident("a type after ::")?;
            if !["field", "tag", "float", "integer", "string", "boolean"]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(&kind))
            {
                return Err(self.unsupported(format!("cast ::{kind}")));
            }
        }
        Ok(())
    }

    fn dimension(&mut self, select: &mut Select) -> Result<(), InfluxqlError> {
        if self.keyword_at(0, "time") && self.peek_at(1) == &Tok::LParen {
            self.next();
            self.next();
            let every_ns = match self.next() {
                Tok::Duration(ns) if ns > 0 => ns,
                _ => {
                    self.at -= 1;
                    return Err(self.expected("a positive duration in time()"));
                }
            };
            let mut offset_ns = 0;
            if self.eat(&Tok::Comma) {
                let negative = self.eat(&Tok::Minus);
                offset_ns = match self.next() {
                    Tok::Duration(ns) => ns,
                    Tok::Ident {
                        name,
                        quoted: false,
                    } if name.eq_ignore_ascii_case("now") => {
                        return Err(self.unsupported("now() as a GROUP BY time offset"));
                    }
                    _ => {
                        self.at -= 1;
                        return Err(self.expected("a duration offset in time()"));
                    }
                };
                if negative {
                    offset_ns = -offset_ns;
                }
            }
            self.expect(&Tok::RParen)?;
            if select.interval.is_some() {
                return Err(self.unsupported("two GROUP BY time() dimensions"));
            }
            select.interval = Some(Interval {
                every_ns,
                offset_ns,
            });
            return Ok(());
        }
        match self.peek().clone() {
            Tok::Star => {
                self.next();
                select.group_all_tags = true;
                Ok(())
            }
            Tok::Regex(_) | Tok::Slash => Err(self.unsupported("GROUP BY a regular expression")),
            Tok::Ident { name, .. } => {
                self.next();
                self.cast()?;
                if !select.group_tags.contains(&name) {
                    select.group_tags.push(name);
                }
                Ok(())
            }
            _ => Err(self.expected("time(), * or a tag key")),
        }
    }

    fn fill(&mut self) -> Result<Fill, InfluxqlError> {
        self.expect(&Tok::LParen)?;
        let negative = self.eat(&Tok::Minus);
        let fill = match self.next() {
            Tok::Ident {
                name,
                quoted: false,
            } if !negative => match name.to_ascii_lowercase().as_str() {
                "null" => Fill::Null,
                "none" => Fill::None,
                "previous" => Fill::Previous,
                "linear" => {
                    self.at -= 1;
                    return Err(self.unsupported("fill(linear)"));
                }
                _ => {
                    self.at -= 1;
                    return Err(self.expected("null, none, previous or a number in fill()"));
                }
            },
            Tok::Int(i) => Fill::Number(if negative { -(i as f64) } else { i as f64 }),
            Tok::Float(f) => Fill::Number(if negative { -f } else { f }),
            _ => {
                self.at -= 1;
                return Err(self.expected("null, none, previous or a number in fill()"));
            }
        };
        self.expect(&Tok::RParen)?;
        Ok(fill)
    }

    fn cond(&mut self) -> Result<Cond, InfluxqlError> {
        let mut left = self.and_cond()?;
        while self.eat_keyword("OR") {
            let right = self.and_cond()?;
            left = Cond::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_cond(&mut self) -> Result<Cond, InfluxqlError> {
        let mut left = self.unary_cond()?;
        while self.eat_keyword("AND") {
            let right = self.unary_cond()?;
            left = Cond::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary_cond(&mut self) -> Result<Cond, InfluxqlError> {
        if self.eat(&Tok::LParen) {
            if self.depth == MAX_DEPTH {
                return Err(self.unsupported(format!(
                    "conditions nested deeper than {MAX_DEPTH} parentheses"
                )));
            }
            self.depth += 1;
            let inner = self.cond()?;
            self.depth -= 1;
            self.expect(&Tok::RParen)?;
            return Ok(inner);
        }
        let (key, quoted) = match self.peek().clone() {
            Tok::Ident { name, quoted } => {
                self.next();
                (name, quoted)
            }
            _ => return Err(self.expected("a condition")),
        };
        if self.peek() == &Tok::LParen {
            return Err(self.unsupported(format!("function {key}() in WHERE")));
        }
        self.cast()?;
        let is_time = key.eq_ignore_ascii_case("time") && (!quoted || key == "time");
        if is_time {
            let op = match self.next() {
                Tok::Gt => TimeOp::Gt,
                Tok::Ge => TimeOp::Ge,
                Tok::Lt => TimeOp::Lt,
                Tok::Le => TimeOp::Le,
                Tok::Eq => TimeOp::Eq,
                Tok::Ne => {
                    self.at -= 1;
                    return Err(self.unsupported("time != (use < and >)"));
                }
                _ => {
                    self.at -= 1;
                    return Err(self.expected("a comparison of time"));
                }
            };
            let at = self.time_expr()?;
            return Ok(Cond::Time { op, at });
        }
        let op = self.next();
        match op {
            Tok::Eq | Tok::Ne => {
                let value = self.literal()?;
                Ok(Cond::Compare {
                    key,
                    negate: op == Tok::Ne,
                    value,
                })
            }
            Tok::EqRegex | Tok::NeRegex => match self.next() {
                Tok::Regex(pattern) => Ok(Cond::Regex {
                    key,
                    negate: op == Tok::NeRegex,
                    pattern,
                }),
                _ => {
                    self.at -= 1;
                    Err(self.expected("a regular expression"))
                }
            },
            Tok::Lt | Tok::Le | Tok::Gt | Tok::Ge => {
                let op = match op {
                    Tok::Lt => "<",
                    Tok::Le => "<=",
                    Tok::Gt => ">",
                    _ => ">=",
                };
                self.literal()?;
                Ok(Cond::Ordered { key, op })
            }
            _ => {
                self.at -= 1;
                Err(self.expected("a comparison operator"))
            }
        }
    }

    fn literal(&mut self) -> Result<Literal, InfluxqlError> {
        let negative = self.eat(&Tok::Minus);
        let lit = match self.next() {
            Tok::Str(s) if !negative => Literal::Str(s),
            Tok::Int(i) => Literal::Number(i as f64),
            Tok::Float(f) => Literal::Number(f),
            Tok::Ident {
                name,
                quoted: false,
            } if !negative && name.eq_ignore_ascii_case("true") => Literal::Bool(true),
            Tok::Ident {
                name,
                quoted: false,
            } if !negative && name.eq_ignore_ascii_case("false") => Literal::Bool(false),
            Tok::Ident { .. } if !negative => {
                self.at -= 1;
                return Err(self.unsupported("comparing two keys"));
            }
            _ => {
                self.at -= 1;
                return Err(self.expected("a string, number or boolean"));
            }
        };
        if matches!(self.peek(), Tok::Plus | Tok::Minus | Tok::Star | Tok::Slash) {
            return Err(self.unsupported("arithmetic in a condition"));
        }
        Ok(match (negative, lit) {
            (true, Literal::Number(n)) => Literal::Number(-n),
            (_, lit) => lit,
        })
    }

    /// `now()`, an epoch (integer ns, or a duration such as `1700000000000ms`), or an
    /// RFC 3339 string, followed by any number of `+ duration` / `- duration`.
    fn time_expr(&mut self) -> Result<TimeExpr, InfluxqlError> {
        // A negative epoch (before 1970): only a number may follow the sign.
        if self.eat(&Tok::Minus) {
            return match self.next() {
                Tok::Duration(ns) | Tok::Int(ns) => {
                    let mut at = TimeExpr {
                        now: false,
                        offset_ns: -ns,
                    };
                    self.time_offsets(&mut at)?;
                    Ok(at)
                }
                _ => {
                    self.at -= 1;
                    Err(self.expected("an epoch time after -"))
                }
            };
        }
        let mut at = match self.next() {
            Tok::Ident {
                name,
                quoted: false,
            } if name.eq_ignore_ascii_case("now") => {
                self.expect(&Tok::LParen)?;
                self.expect(&Tok::RParen)?;
                TimeExpr {
                    now: true,
                    offset_ns: 0,
                }
            }
            Tok::Duration(ns) | Tok::Int(ns) => TimeExpr {
                now: false,
                offset_ns: ns,
            },
            Tok::Str(s) => {
                self.at -= 1;
                let ns = parse_rfc3339(&s).ok_or_else(|| InfluxqlError::Parse {
                    pos: self.pos(),
                    msg: format!(
                        "invalid time '{s}' (expected RFC 3339, e.g. '2024-01-02T03:04:05Z')"
                    ),
                })?;
                self.at += 1;
                TimeExpr {
                    now: false,
                    offset_ns: ns,
                }
            }
            _ => {
                self.at -= 1;
                return Err(self.expected("now(), an epoch time or an RFC 3339 string"));
            }
        };
        self.time_offsets(&mut at)?;
        Ok(at)
    }

    /// Any number of `+ duration` / `- duration` after a time.
    fn time_offsets(&mut self, at: &mut TimeExpr) -> Result<(), InfluxqlError> {
        loop {
            let sign = if self.eat(&Tok::Plus) {
                1
            } else if self.eat(&Tok::Minus) {
                -1
            } else {
                break;
            };
            let d = match self.next() {
                Tok::Duration(ns) | Tok::Int(ns) => ns,
                _ => {
                    self.at -= 1;
                    return Err(self.expected("a duration"));
                }
            };
            at.offset_ns = at.offset_ns.saturating_add(d.saturating_mul(sign));
        }
        if matches!(self.peek(), Tok::Star | Tok::Slash) {
            return Err(self.unsupported("multiplying or dividing times"));
        }
        Ok(())
    }
}

/// An RFC 3339 time (`2024-01-02T03:04:05.123Z`, also with a space for the `T`, or a
/// date alone) in nanoseconds since the epoch; `None` if malformed or before 1970.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let text = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    let t = humantime::parse_rfc3339_weak(&text).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_nanos()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Statement {
        let mut v = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(v.len(), 1);
        v.remove(0)
    }

    fn select(text: &str) -> Select {
        match one(text) {
            Statement::Select(s) => s,
            other => panic!("{other:?}"),
        }
    }

    const H: i64 = 3_600_000_000_000;

    #[test]
    fn grafana_builder_query_parses() {
        let s = select(
            r#"SELECT mean("temp") AS "t", max("hum") FROM "autogen"."telemetry" WHERE ("device" =~ /^(a|b)$/ OR "site" = 'x') AND time >= 1700000000000ms and time <= 1700003600000ms GROUP BY time(10s), "device" fill(null) ORDER BY time DESC LIMIT 5"#,
        );
        assert_eq!(
            s.fields,
            vec![
                SelectField {
                    expr: FieldExpr::Call {
                        func: Func::Mean,
                        field: "temp".into()
                    },
                    alias: Some("t".into())
                },
                SelectField {
                    expr: FieldExpr::Call {
                        func: Func::Max,
                        field: "hum".into()
                    },
                    alias: None
                },
            ]
        );
        assert_eq!(s.from.retention_policy.as_deref(), Some("autogen"));
        assert_eq!(s.from.name, "telemetry");
        assert_eq!(
            s.interval,
            Some(Interval {
                every_ns: 10_000_000_000,
                offset_ns: 0
            })
        );
        assert_eq!(s.group_tags, vec!["device".to_owned()]);
        assert_eq!(s.fill, Fill::Null);
        assert!(s.descending);
        assert_eq!(s.limit, Some(5));
        let Some(Cond::And(left, right)) = s.cond else {
            panic!("top-level AND")
        };
        assert!(
            matches!(*right, Cond::Time { op: TimeOp::Le, at } if at.offset_ns == 1_700_003_600_000_000_000)
        );
        let Cond::And(tags, lower) = *left else {
            panic!("nested AND")
        };
        assert!(matches!(*tags, Cond::Or(..)));
        assert!(matches!(*lower, Cond::Time { op: TimeOp::Ge, .. }));
    }

    #[test]
    fn times_fills_and_shows() {
        let s = select(
            "select last(v) from m where time > now() - 6h + 30m and time < '2024-01-02T00:00:00Z' fill(-1.5)",
        );
        assert_eq!(s.fill, Fill::Number(-1.5));
        let Some(Cond::And(a, b)) = s.cond else {
            panic!()
        };
        assert_eq!(
            *a,
            Cond::Time {
                op: TimeOp::Gt,
                at: TimeExpr {
                    now: true,
                    offset_ns: -6 * H + H / 2
                }
            }
        );
        assert_eq!(
            *b,
            Cond::Time {
                op: TimeOp::Lt,
                at: TimeExpr {
                    now: false,
                    offset_ns: 1_704_153_600_000_000_000
                }
            }
        );
        assert_eq!(
            one(
                r#"SHOW TAG VALUES FROM "telemetry" WITH KEY = "device" WHERE "site" =~ /b/ LIMIT 3"#
            ),
            Statement::ShowTagValues {
                from: Some(Measurement {
                    database: None,
                    retention_policy: None,
                    name: "telemetry".into()
                }),
                keys: NameFilter::Eq("device".into()),
                cond: Some(Cond::Regex {
                    key: "site".into(),
                    negate: false,
                    pattern: "b".into()
                }),
                limit: Some(3),
            }
        );
        assert_eq!(
            parse("SHOW DATABASES; show measurements limit 1;SHOW FIELD KEYS FROM telemetry; show tag keys; SHOW RETENTION POLICIES ON \"fluxgate\"")
                .expect("parses")
                .len(),
            5
        );
    }

    /// Every unsupported construct is refused by name; none is half-understood.
    #[test]
    fn unsupported_parts_are_named() {
        for (text, named) in [
            ("SELECT * FROM m", "SELECT *"),
            ("SELECT median(v) FROM m", "median()"),
            ("SELECT mean(v) * 2 FROM m", "arithmetic"),
            (
                "SELECT v FROM m GROUP BY time(1m) fill(linear)",
                "fill(linear)",
            ),
            ("SELECT v FROM a, b", "more than one measurement"),
            ("SELECT v FROM (SELECT v FROM m)", "subqueries"),
            ("SELECT v FROM m WHERE time != 5", "time !="),
            ("SELECT v FROM m tz('Europe/Berlin')", "tz()"),
            ("DROP DATABASE x", "DROP statements"),
            ("SHOW SERIES", "SHOW SERIES"),
            ("SELECT v FROM m ORDER BY v", "ORDER BY"),
            ("SELECT percentile(v, 90) FROM m", "percentile()"),
            ("SELECT mean(v, 3) FROM m", "more than one argument"),
            ("SELECT v INTO x FROM m", "SELECT INTO"),
            ("SELECT v FROM /re/", "regular expression in FROM"),
        ] {
            match parse(text) {
                Err(InfluxqlError::Unsupported { what, .. }) => {
                    assert!(what.contains(named), "{text}: {what}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let deep = format!(
            "SELECT v FROM m WHERE {}a = 'b'{}",
            "(".repeat(40),
            ")".repeat(40)
        );
        assert!(matches!(
            parse(&deep),
            Err(InfluxqlError::Unsupported { .. })
        ));
        let many = "SHOW DATABASES;".repeat(40);
        assert!(matches!(
            parse(&many),
            Err(InfluxqlError::Unsupported { .. })
        ));
    }

    #[test]
    fn syntax_errors_say_what_was_found() {
        for (text, msg) in [
            ("", "empty query"),
            ("SELECT", "found EOF, expected a field or function"),
            ("SELECT v", "found EOF, expected FROM"),
            ("SELECT v FROM m WHERE", "found EOF, expected a condition"),
            ("SELECT v FROM m WHERE a ~ 'b'", "unexpected character"),
            ("SELECT v FROM m GROUP BY time(0s)", "positive duration"),
            ("SELECT v FROM m LIMIT x", "a count after LIMIT"),
            ("SELECT v FROM m x", "found x, expected ; or end of query"),
            ("SELECT v FROM m WHERE time > 'yesterday'", "invalid time"),
        ] {
            match parse(text) {
                Err(InfluxqlError::Parse { msg: m, .. }) => assert!(m.contains(msg), "{text}: {m}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    /// Print a statement the way a client would write it, fully parenthesised, so that
    /// parsing it back must give the same tree.
    fn print(s: &Select) -> String {
        fn cond(c: &Cond) -> String {
            match c {
                Cond::And(a, b) => format!("({} AND {})", cond(a), cond(b)),
                Cond::Or(a, b) => format!("({} OR {})", cond(a), cond(b)),
                Cond::Compare {
                    key,
                    negate,
                    value: Literal::Str(v),
                } => format!(
                    "\"{key}\" {} '{}'",
                    if *negate { "!=" } else { "=" },
                    v.replace('\\', "\\\\").replace('\'', "\\'")
                ),
                Cond::Regex {
                    key,
                    negate,
                    pattern,
                } => format!(
                    "\"{key}\" {} /{}/",
                    if *negate { "!~" } else { "=~" },
                    pattern.replace('/', "\\/")
                ),
                Cond::Time { op, at } => format!(
                    "time {} {}{}ns",
                    match op {
                        TimeOp::Gt => ">",
                        TimeOp::Ge => ">=",
                        TimeOp::Lt => "<",
                        TimeOp::Le => "<=",
                        TimeOp::Eq => "=",
                    },
                    match (at.now, at.offset_ns < 0) {
                        (true, true) => "now() - ",
                        (true, false) => "now() + ",
                        (false, true) => "-",
                        (false, false) => "",
                    },
                    at.offset_ns.unsigned_abs()
                ),
                other => unreachable!("not generated: {other:?}"),
            }
        }
        let fields: Vec<String> = s
            .fields
            .iter()
            .map(|f| {
                let e = match &f.expr {
                    FieldExpr::Raw(name) => format!("\"{name}\""),
                    FieldExpr::Call { func, field } => format!("{}(\"{field}\")", func.name()),
                };
                match &f.alias {
                    Some(a) => format!("{e} AS \"{a}\""),
                    None => e,
                }
            })
            .collect();
        let mut out = format!("SELECT {} FROM \"{}\"", fields.join(", "), s.from.name);
        if let Some(c) = &s.cond {
            out += &format!(" WHERE {}", cond(c));
        }
        let mut dims: Vec<String> = Vec::new();
        if let Some(i) = s.interval {
            dims.push(format!("time({}ns, {}ns)", i.every_ns, i.offset_ns));
        }
        dims.extend(s.group_tags.iter().map(|t| format!("\"{t}\"")));
        if !dims.is_empty() {
            out += &format!(" GROUP BY {}", dims.join(", "));
        }
        out += match s.fill {
            Fill::Null => " fill(null)",
            Fill::None => " fill(none)",
            Fill::Previous => " fill(previous)",
            Fill::Number(_) => " fill(0)",
        };
        if s.descending {
            out += " ORDER BY time DESC";
        }
        if let Some(l) = s.limit {
            out += &format!(" LIMIT {l}");
        }
        out
    }

    fn arb_name() -> impl proptest::strategy::Strategy<Value = String> {
        "[a-z_][a-z0-9_.-]{0,6}"
    }

    fn arb_cond() -> impl proptest::strategy::Strategy<Value = Cond> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            (arb_name(), any::<bool>(), "[ -~]{0,8}").prop_map(|(key, negate, v)| Cond::Compare {
                key,
                negate,
                value: Literal::Str(v)
            }),
            (arb_name(), any::<bool>(), "[a-z^$.|()/]{0,8}").prop_map(|(key, negate, pattern)| {
                Cond::Regex {
                    key,
                    negate,
                    pattern,
                }
            }),
        ];
        leaf.prop_recursive(4, 16, 2, |inner| {
            prop_oneof![
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| Cond::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| Cond::Or(Box::new(a), Box::new(b))),
            ]
        })
    }

    fn arb_select() -> impl proptest::strategy::Strategy<Value = Select> {
        use proptest::prelude::*;
        let func = proptest::sample::select(vec![
            Func::Mean,
            Func::Min,
            Func::Max,
            Func::First,
            Func::Last,
            Func::Count,
            Func::Sum,
        ]);
        let field = (
            proptest::option::of(func),
            arb_name(),
            proptest::option::of(arb_name()),
        )
            .prop_map(|(func, name, alias)| SelectField {
                expr: match func {
                    Some(func) => FieldExpr::Call { func, field: name },
                    None => FieldExpr::Raw(name),
                },
                alias,
            });
        let time = (
            any::<bool>(),
            -1_000_000_000_000i64..1_000_000_000_000,
            proptest::sample::select(vec![
                TimeOp::Gt,
                TimeOp::Ge,
                TimeOp::Lt,
                TimeOp::Le,
                TimeOp::Eq,
            ]),
        )
            .prop_map(|(now, offset_ns, op)| Cond::Time {
                op,
                at: TimeExpr { now, offset_ns },
            });
        (
            proptest::collection::vec(field, 1..4),
            arb_name(),
            proptest::option::of(arb_cond()),
            proptest::collection::vec(time, 0..3),
            proptest::option::of((1i64..1_000_000_000_000, 0i64..1_000_000)),
            proptest::collection::btree_set(arb_name(), 0..3),
            proptest::sample::select(vec![
                Fill::Null,
                Fill::None,
                Fill::Previous,
                Fill::Number(0.0),
            ]),
            any::<bool>(),
            proptest::option::of(0usize..1000),
        )
            .prop_map(
                |(fields, m, tags, times, interval, group, fill, descending, limit)| {
                    // Time bounds are ANDed after the tag condition, as Grafana writes them.
                    let cond = times.into_iter().fold(tags, |acc, t| match acc {
                        Some(c) => Some(Cond::And(Box::new(c), Box::new(t))),
                        None => Some(t),
                    });
                    Select {
                        fields,
                        from: Measurement {
                            database: None,
                            retention_policy: None,
                            name: m,
                        },
                        cond,
                        interval: interval.map(|(every_ns, offset_ns)| Interval {
                            every_ns,
                            offset_ns,
                        }),
                        group_tags: group.into_iter().collect(),
                        group_all_tags: false,
                        fill,
                        descending,
                        limit,
                        offset: 0,
                        slimit: None,
                        soffset: 0,
                    }
                },
            )
    }

    proptest::proptest! {
        /// No input panics the parser; each answer is statements or an error value.
        #[test]
        fn never_panics_on_any_text(text in ".{0,200}") {
            let _ = parse(&text);
        }

        /// Printing any statement of the subset and parsing it back gives the same tree.
        #[test]
        fn printed_statements_parse_back_to_themselves(s in arb_select()) {
            let text = print(&s);
            let parsed = parse(&text).map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{text}: {e}")))?;
            proptest::prop_assert_eq!(parsed, vec![Statement::Select(s)], "{}", text);
        }

        /// Token soup from the grammar's own vocabulary reaches deeper than random text.
        #[test]
        fn never_panics_on_grammar_shaped_text(words in proptest::collection::vec(proptest::sample::select(vec![
            "SELECT", "mean(", "\"v\"", ")", "FROM", "m", "WHERE", "time", ">=", "now()", "-", "6h",
            "AND", "OR", "(", "\"device\"", "=~", "/^a$/", "=", "'x'", "GROUP", "BY", "time(1m)", ",",
            "fill(", "null", "previous", "0", "LIMIT", "10", ";", "SHOW", "TAG", "VALUES", "WITH", "KEY",
            "1700000000000ms", "'2024-01-01T00:00:00Z'", "::field", "AS", "*", "/", "µ", "\\",
        ]), 0..40)) {
            let _ = parse(&words.join(" "));
        }
    }
}
