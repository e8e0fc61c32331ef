//! Filters of meters (and SLOs): a SQL boolean expression over `events` columns, parsed once at
//! startup into a small expression of columns, literals and plain operators, which each store
//! renders in its own SQL dialect. Anything else (functions, subqueries, arithmetic, casts) is
//! refused, so a filter means the same on every store and cannot do work of its own.

use std::fmt;

use meterd_schemas::columns::{COLUMNS, Column, Kind, Value};
use sqlparser::ast::{self, BinaryOperator, UnaryOperator};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

/// The longest filter, in bytes.
const MAX_FILTER_BYTES: usize = 4096;
/// The deepest nesting of a filter's expression.
const MAX_DEPTH: usize = 32;

/// A parsed filter.
#[derive(Debug, Clone)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Compare {
        left: Operand,
        op: CompareOp,
        right: Operand,
    },
    IsNull {
        column: &'static Column,
        negated: bool,
    },
    InList {
        column: &'static Column,
        list: Vec<Literal>,
        negated: bool,
    },
    Between {
        column: &'static Column,
        low: Literal,
        high: Literal,
        negated: bool,
    },
    Bool(bool),
}

/// One side of a comparison.
#[derive(Debug, Clone)]
pub enum Operand {
    Column(&'static Column),
    Literal(Literal),
}

/// A constant: text or a 64-bit integer, as the columns a filter may name are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    Text(String),
    Int(i64),
}

impl Literal {
    fn kind(&self) -> Kind {
        match self {
            Literal::Text(_) => Kind::Text,
            Literal::Int(_) => Kind::Int,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    NotEq,
    Lt,
    LtEq,
    Gt,
    GtEq,
}

impl CompareOp {
    pub fn sql(self) -> &'static str {
        match self {
            CompareOp::Eq => "=",
            CompareOp::NotEq => "<>",
            CompareOp::Lt => "<",
            CompareOp::LtEq => "<=",
            CompareOp::Gt => ">",
            CompareOp::GtEq => ">=",
        }
    }

    /// Whether the comparison depends on the order of text, not only its equality.
    pub fn orders(self) -> bool {
        !matches!(self, CompareOp::Eq | CompareOp::NotEq)
    }
}

/// Why a filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

/// A column a filter, a meter's field or a group-by may name: text and integer columns.
pub fn filter_column(name: &str) -> Result<&'static Column, String> {
    let column = COLUMNS
        .iter()
        .find(|c| c.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| format!("events has no column {name:?}"))?;
    match column.kind {
        Kind::Text | Kind::Int => Ok(column),
        Kind::Time => Err(format!(
            "column {:?} is a time; the period and the window bound time",
            column.name
        )),
        Kind::Dimensions => Err(format!(
            "column {:?} is a map; name a text or integer column",
            column.name
        )),
    }
}

impl Filter {
    /// Parses `sql`, a boolean expression over the columns of `events`.
    pub fn parse(sql: &str) -> Result<Filter, FilterError> {
        if sql.len() > MAX_FILTER_BYTES {
            return Err(FilterError(format!(
                "the filter has {} bytes, more than {MAX_FILTER_BYTES}",
                sql.len()
            )));
        }
        let mut parser = Parser::new(&GenericDialect {})
            .with_recursion_limit(MAX_DEPTH)
            .try_with_sql(sql)
            .map_err(|e| FilterError(format!("the filter does not parse: {e}")))?;
        let expr = parser
            .parse_expr()
            .map_err(|e| FilterError(format!("the filter does not parse: {e}")))?;
        let rest = parser.peek_token();
        if rest.token != Token::EOF {
            return Err(FilterError(format!(
                "the filter ends at {}; one boolean expression is expected",
                rest.token
            )));
        }
        boolean(&expr, 0).map_err(FilterError)
    }

    /// Renders the filter with `dialect`: true exactly where SQL's three-valued logic makes
    /// it true (a comparison with NULL is unknown, and so is its negation).
    pub fn render(&self, dialect: &dyn FilterDialect) -> String {
        if dialect.spells_out_null_logic() {
            return self.truth(dialect, true);
        }
        let mut out = String::new();
        self.render_into(dialect, &mut out);
        out
    }

    /// Where the filter is definitely true (`want`) or definitely false (`!want`), as an
    /// expression of plain 0/1 conditions that never meet a NULL: for servers whose NULL logic
    /// differs from SQL's (ClickHouse 18.16 answers `NULL NOT IN (...)` with true).
    fn truth(&self, d: &dyn FilterDialect, want: bool) -> String {
        let not_null = |c: &Column| format!("isNotNull({})", d.column(c.name));
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                // A conjunction is true when both are, false when either is; dually for OR.
                let both = matches!(self, Filter::And(..)) == want;
                format!(
                    "({}) {} ({})",
                    a.truth(d, want),
                    if both { "AND" } else { "OR" },
                    b.truth(d, want)
                )
            }
            Filter::Not(a) => a.truth(d, !want),
            Filter::Compare { left, op, right } => {
                let mut guards = Vec::new();
                for o in [left, right] {
                    if let Operand::Column(c) = o {
                        guards.push(not_null(c));
                    }
                }
                let comparison = comparison_sql(d, left, *op, right);
                let body = if want {
                    comparison
                } else {
                    format!("NOT ({comparison})")
                };
                guards.push(body);
                guards.join(" AND ")
            }
            Filter::IsNull { column, negated } => {
                if want != *negated {
                    format!("isNull({})", d.column(column.name))
                } else {
                    not_null(column)
                }
            }
            Filter::InList {
                column,
                list,
                negated,
            } => {
                let items: Vec<String> = list.iter().map(|l| d.literal(l)).collect();
                format!(
                    "{} AND {} {}IN ({})",
                    not_null(column),
                    d.column(column.name),
                    if want == *negated { "NOT " } else { "" },
                    items.join(", ")
                )
            }
            Filter::Between {
                column,
                low,
                high,
                negated,
            } => {
                let c = ordered_column(d, column);
                let (lo, hi) = (d.literal(low), d.literal(high));
                if want != *negated {
                    format!("{} AND {c} >= {lo} AND {c} <= {hi}", not_null(column))
                } else {
                    format!("{} AND ({c} < {lo} OR {c} > {hi})", not_null(column))
                }
            }
            Filter::Bool(b) => d.boolean(*b == want).to_owned(),
        }
    }

    fn render_into(&self, d: &dyn FilterDialect, out: &mut String) {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                out.push('(');
                a.render_into(d, out);
                out.push_str(if matches!(self, Filter::And(..)) {
                    ") AND ("
                } else {
                    ") OR ("
                });
                b.render_into(d, out);
                out.push(')');
            }
            Filter::Not(a) => {
                out.push_str("NOT (");
                a.render_into(d, out);
                out.push(')');
            }
            Filter::Compare { left, op, right } => {
                out.push_str(&comparison_sql(d, left, *op, right));
            }
            Filter::IsNull { column, negated } => out.push_str(&format!(
                "{} IS {}NULL",
                d.column(column.name),
                if *negated { "NOT " } else { "" }
            )),
            Filter::InList {
                column,
                list,
                negated,
            } => {
                let items: Vec<String> = list.iter().map(|l| d.literal(l)).collect();
                out.push_str(&format!(
                    "{} {}IN ({})",
                    d.column(column.name),
                    if *negated { "NOT " } else { "" },
                    items.join(", ")
                ));
            }
            Filter::Between {
                column,
                low,
                high,
                negated,
            } => {
                let c = ordered_column(d, column);
                // Spelled out: `BETWEEN` and `NOT BETWEEN` treat NULL alike everywhere, but
                // the two comparisons leave no doubt.
                let both = format!("{c} >= {} AND {c} <= {}", d.literal(low), d.literal(high));
                if *negated {
                    out.push_str(&format!("NOT ({both})"));
                } else {
                    out.push_str(&format!("({both})"));
                }
            }
            Filter::Bool(b) => out.push_str(d.boolean(*b)),
        }
    }

    /// The filter on one event, by SQL's three-valued logic: `None` where SQL says unknown (a
    /// comparison with NULL). Text is ordered by its UTF-8 bytes, as every store orders it.
    /// Counting in Rust (the SLO counters of `/metrics`) agrees with the stores' counts.
    pub fn eval(&self, e: &meterd_schemas::StoredEvent) -> Option<bool> {
        match self {
            Filter::And(a, b) => match (a.eval(e), b.eval(e)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Filter::Or(a, b) => match (a.eval(e), b.eval(e)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Filter::Not(a) => a.eval(e).map(|b| !b),
            Filter::Compare { left, op, right } => {
                let ordering = compare(operand_value(left, e)?, operand_value(right, e)?)?;
                Some(match op {
                    CompareOp::Eq => ordering.is_eq(),
                    CompareOp::NotEq => ordering.is_ne(),
                    CompareOp::Lt => ordering.is_lt(),
                    CompareOp::LtEq => ordering.is_le(),
                    CompareOp::Gt => ordering.is_gt(),
                    CompareOp::GtEq => ordering.is_ge(),
                })
            }
            Filter::IsNull { column, negated } => {
                Some(column_value(column, e).is_none() != *negated)
            }
            Filter::InList {
                column,
                list,
                negated,
            } => {
                let v = column_value(column, e)?;
                let found = list
                    .iter()
                    .any(|l| compare(v, l.into()) == Some(std::cmp::Ordering::Equal));
                Some(found != *negated)
            }
            Filter::Between {
                column,
                low,
                high,
                negated,
            } => {
                let v = column_value(column, e)?;
                let within = compare(v, low.into())?.is_ge() && compare(v, high.into())?.is_le();
                Some(within != *negated)
            }
            Filter::Bool(b) => Some(*b),
        }
    }

    /// The columns the filter names.
    pub fn columns(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        self.visit_columns(&mut |c| {
            if !out.contains(&c.name) {
                out.push(c.name);
            }
        });
        out
    }

    fn visit_columns(&self, f: &mut dyn FnMut(&'static Column)) {
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.visit_columns(f);
                b.visit_columns(f);
            }
            Filter::Not(a) => a.visit_columns(f),
            Filter::Compare { left, right, .. } => {
                for o in [left, right] {
                    if let Operand::Column(c) = o {
                        f(c);
                    }
                }
            }
            Filter::IsNull { column, .. }
            | Filter::InList { column, .. }
            | Filter::Between { column, .. } => f(column),
            Filter::Bool(_) => {}
        }
    }
}

/// A value a filter compares, borrowed from an event or a literal.
#[derive(Clone, Copy)]
enum Scalar<'a> {
    Text(&'a str),
    Int(i64),
}

impl<'a> From<&'a Literal> for Scalar<'a> {
    fn from(l: &'a Literal) -> Self {
        match l {
            Literal::Text(t) => Scalar::Text(t),
            Literal::Int(i) => Scalar::Int(*i),
        }
    }
}

/// A column's value for one event; `None` for NULL.
fn column_value<'a>(column: &Column, e: &'a meterd_schemas::StoredEvent) -> Option<Scalar<'a>> {
    match (column.read)(e) {
        Value::Text(t) => t.map(Scalar::Text),
        Value::Int(i) => i.map(Scalar::Int),
        // Filters name text and integer columns only (`filter_column`).
        Value::Time(_) | Value::Dimensions(_) => None,
    }
}

fn operand_value<'a>(o: &'a Operand, e: &'a meterd_schemas::StoredEvent) -> Option<Scalar<'a>> {
    match o {
        Operand::Column(c) => column_value(c, e),
        Operand::Literal(l) => Some(l.into()),
    }
}

/// Two values of one kind in order (text by its bytes); `None` across kinds, which parsing
/// refuses.
fn compare(a: Scalar<'_>, b: Scalar<'_>) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Scalar::Text(a), Scalar::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (Scalar::Int(a), Scalar::Int(b)) => Some(a.cmp(&b)),
        _ => None,
    }
}

/// `left op right`, text compared by its bytes where the operator orders.
fn comparison_sql(d: &dyn FilterDialect, left: &Operand, op: CompareOp, right: &Operand) -> String {
    let text = matches!(left, Operand::Column(c) if c.kind == Kind::Text)
        || matches!(left, Operand::Literal(Literal::Text(_)));
    let side = |o: &Operand| match o {
        Operand::Column(c) if text && op.orders() => d.text_in_byte_order(c.name),
        Operand::Column(c) => d.column(c.name),
        Operand::Literal(l) => d.literal(l),
    };
    format!("{} {} {}", side(left), op.sql(), side(right))
}

/// A column as a range bound compares it: text by its bytes.
fn ordered_column(d: &dyn FilterDialect, column: &Column) -> String {
    if column.kind == Kind::Text {
        d.text_in_byte_order(column.name)
    } else {
        d.column(column.name)
    }
}

/// How a store writes what a filter is made of.
pub trait FilterDialect {
    /// A column by its `events` name.
    fn column(&self, name: &str) -> String {
        name.to_owned()
    }

    /// A text column compared by order: meterd orders text by its UTF-8 bytes on every store
    /// (PostgreSQL adds `COLLATE "C"`).
    fn text_in_byte_order(&self, name: &str) -> String {
        self.column(name)
    }

    /// A string literal, quoted and escaped.
    fn text_literal(&self, s: &str) -> String {
        format!("'{}'", s.replace('\'', "''"))
    }

    fn literal(&self, l: &Literal) -> String {
        match l {
            Literal::Text(s) => self.text_literal(s),
            Literal::Int(i) => i.to_string(),
        }
    }

    fn boolean(&self, b: bool) -> &'static str {
        if b { "TRUE" } else { "FALSE" }
    }

    /// Whether the server's NULL logic differs from SQL's, so the filter is written as plain
    /// true/false conditions guarded against NULL (see `Filter::render`).
    fn spells_out_null_logic(&self) -> bool {
        false
    }
}

fn boolean(expr: &ast::Expr, depth: usize) -> Result<Filter, String> {
    if depth > MAX_DEPTH {
        return Err(format!("the filter is nested deeper than {MAX_DEPTH}"));
    }
    let depth = depth + 1;
    match expr {
        ast::Expr::Nested(inner) => boolean(inner, depth),
        ast::Expr::BinaryOp { left, op, right } => match op {
            BinaryOperator::And => Ok(Filter::And(
                Box::new(boolean(left, depth)?),
                Box::new(boolean(right, depth)?),
            )),
            BinaryOperator::Or => Ok(Filter::Or(
                Box::new(boolean(left, depth)?),
                Box::new(boolean(right, depth)?),
            )),
            _ => {
                let op = match op {
                    BinaryOperator::Eq => CompareOp::Eq,
                    BinaryOperator::NotEq => CompareOp::NotEq,
                    BinaryOperator::Lt => CompareOp::Lt,
                    BinaryOperator::LtEq => CompareOp::LtEq,
                    BinaryOperator::Gt => CompareOp::Gt,
                    BinaryOperator::GtEq => CompareOp::GtEq,
                    other => {
                        return Err(format!(
                            "operator {other} is not allowed; use comparisons, AND, OR, NOT, \
                             IS [NOT] NULL, [NOT] IN and [NOT] BETWEEN"
                        ));
                    }
                };
                let (left, right) = (operand(left)?, operand(right)?);
                let kind = |o: &Operand| match o {
                    Operand::Column(c) => c.kind,
                    Operand::Literal(l) => l.kind(),
                };
                if kind(&left) != kind(&right) {
                    return Err(format!(
                        "{} compares {} with {}",
                        expr,
                        kind_name(kind(&left)),
                        kind_name(kind(&right))
                    ));
                }
                if matches!((&left, &right), (Operand::Literal(_), Operand::Literal(_))) {
                    return Err(format!("{expr} compares two constants; name a column"));
                }
                Ok(Filter::Compare { left, op, right })
            }
        },
        ast::Expr::UnaryOp {
            op: UnaryOperator::Not,
            expr,
        } => Ok(Filter::Not(Box::new(boolean(expr, depth)?))),
        ast::Expr::IsNull(inner) | ast::Expr::IsNotNull(inner) => Ok(Filter::IsNull {
            column: column_of(inner)?,
            negated: matches!(expr, ast::Expr::IsNotNull(_)),
        }),
        ast::Expr::InList {
            expr: inner,
            list,
            negated,
        } => {
            let column = column_of(inner)?;
            let list = list
                .iter()
                .map(|e| typed_literal(e, column))
                .collect::<Result<Vec<_>, _>>()?;
            if list.is_empty() {
                return Err("IN needs at least one value".to_owned());
            }
            Ok(Filter::InList {
                column,
                list,
                negated: *negated,
            })
        }
        ast::Expr::Between {
            expr: inner,
            negated,
            low,
            high,
        } => {
            let column = column_of(inner)?;
            Ok(Filter::Between {
                column,
                low: typed_literal(low, column)?,
                high: typed_literal(high, column)?,
                negated: *negated,
            })
        }
        ast::Expr::Value(v) => match &v.value {
            ast::Value::Boolean(b) => Ok(Filter::Bool(*b)),
            other => Err(format!("{other} is not a condition")),
        },
        ast::Expr::Identifier(_) => Err(format!(
            "{expr} is a column, not a condition; compare it with a value"
        )),
        ast::Expr::Subquery(_) | ast::Expr::InSubquery { .. } | ast::Expr::Exists { .. } => {
            Err("subqueries are not allowed in a filter".to_owned())
        }
        ast::Expr::Function(f) => Err(format!(
            "functions are not allowed in a filter ({})",
            f.name
        )),
        other => Err(format!(
            "{other} is not allowed; use comparisons, AND, OR, NOT, IS [NOT] NULL, [NOT] IN \
             and [NOT] BETWEEN over columns and constants"
        )),
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "text",
        Kind::Int => "an integer",
        Kind::Time => "a time",
        Kind::Dimensions => "a map",
    }
}

fn column_of(expr: &ast::Expr) -> Result<&'static Column, String> {
    match expr {
        ast::Expr::Nested(inner) => column_of(inner),
        ast::Expr::Identifier(ident) => filter_column(&ident.value),
        other => Err(format!("{other} is not a column of events")),
    }
}

fn operand(expr: &ast::Expr) -> Result<Operand, String> {
    match expr {
        ast::Expr::Nested(inner) => operand(inner),
        ast::Expr::Identifier(ident) => filter_column(&ident.value).map(Operand::Column),
        _ => literal(expr).map(Operand::Literal),
    }
}

fn typed_literal(expr: &ast::Expr, column: &Column) -> Result<Literal, String> {
    let l = literal(expr)?;
    if l.kind() != column.kind {
        return Err(format!(
            "{} is {}, but {expr} is {}",
            column.name,
            kind_name(column.kind),
            kind_name(l.kind())
        ));
    }
    Ok(l)
}

fn literal(expr: &ast::Expr) -> Result<Literal, String> {
    match expr {
        ast::Expr::Nested(inner) => literal(inner),
        ast::Expr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) => Ok(Literal::Text(s.clone())),
            ast::Value::Number(n, false) => n
                .parse::<i64>()
                .map(Literal::Int)
                .map_err(|_| format!("{n} is not a 64-bit integer")),
            other => Err(format!("{other} is not a text or integer constant")),
        },
        ast::Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr: inner,
        } => match literal(inner)? {
            Literal::Int(i) => i
                .checked_neg()
                .map(Literal::Int)
                .ok_or_else(|| format!("{expr} is not a 64-bit integer")),
            Literal::Text(_) => Err(format!("{expr} negates text")),
        },
        ast::Expr::Function(f) => Err(format!(
            "functions are not allowed in a filter ({})",
            f.name
        )),
        ast::Expr::Subquery(_) => Err("subqueries are not allowed in a filter".to_owned()),
        ast::Expr::BinaryOp { op, .. } => Err(format!(
            "operator {op} is not allowed; compare a column with a constant or a column"
        )),
        other => Err(format!("{other} is not a column or a constant")),
    }
}

impl fmt::Display for Filter {
    /// The filter in standard SQL, as PostgreSQL and DataFusion read it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Standard;
        impl FilterDialect for Standard {}
        f.write_str(&self.render(&Standard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Standard;
    impl FilterDialect for Standard {}

    #[test]
    fn eval_follows_sql_three_valued_logic() {
        use meterd_schemas::{AgentRun, Event, EventData, StoredEvent};
        let run = |agent: Option<&str>, status: Option<&str>| StoredEvent {
            ingested_at_us: 0,
            event: Event {
                tenant: "acme".to_owned(),
                id: "x".to_owned(),
                time_us: 0,
                subject: None,
                source: None,
                dimensions: Default::default(),
                data: EventData::AgentRun(AgentRun {
                    agent: agent.map(str::to_owned),
                    run_id: "r".to_owned(),
                    parent_run_id: None,
                    status: status.map(str::to_owned),
                    duration_ms: 1500,
                    steps: None,
                    tool_calls: None,
                }),
            },
        };
        let eval = |sql: &str, e: &StoredEvent| Filter::parse(sql).expect(sql).eval(e);
        let none = run(None, Some("succeeded"));
        let named = run(Some("Bot"), Some("failed"));
        for (sql, on_none, on_named) in [
            ("agent = 'Bot'", None, Some(true)),
            ("NOT (agent = 'Bot')", None, Some(false)),
            ("agent IS NULL", Some(true), Some(false)),
            ("agent IS NOT NULL", Some(false), Some(true)),
            ("agent NOT IN ('x', 'y')", None, Some(true)),
            ("agent IN ('Bot')", None, Some(true)),
            (
                "agent = 'Bot' OR status = 'succeeded'",
                Some(true),
                Some(true),
            ),
            ("agent = 'Bot' AND status = 'succeeded'", None, Some(false)),
            ("agent = 'Bot' OR status = 'failed'", None, Some(true)),
            // Text in byte order: 'B' (66) sorts before 'b' (98).
            ("agent < 'b'", None, Some(true)),
            ("agent BETWEEN 'A' AND 'C'", None, Some(true)),
            ("agent NOT BETWEEN 'A' AND 'C'", None, Some(false)),
            (
                "duration_ms >= 1500 AND duration_ms < 1501",
                Some(true),
                Some(true),
            ),
            ("FALSE", Some(false), Some(false)),
        ] {
            assert_eq!(eval(sql, &none), on_none, "{sql} without an agent");
            assert_eq!(eval(sql, &named), on_named, "{sql} with agent Bot");
        }
    }

    #[test]
    fn plain_conditions_parse_and_render() {
        let f = Filter::parse("status = 'succeeded' AND agent <> 'test'").expect("parses");
        assert_eq!(f.columns(), ["status", "agent"]);
        assert_eq!(
            f.render(&Standard),
            "(status = 'succeeded') AND (agent <> 'test')"
        );
        let f = Filter::parse(
            "NOT (status_code BETWEEN 500 AND 599) OR route IN ('/a', 'it''s') \
             OR model IS NOT NULL OR -5 < duration_ms",
        )
        .expect("parses");
        assert_eq!(
            f.render(&Standard),
            "(((NOT ((status_code >= 500 AND status_code <= 599))) OR (route IN ('/a', 'it''s'))) \
             OR (model IS NOT NULL)) OR (-5 < duration_ms)"
        );
    }

    struct SpelledOut;
    impl FilterDialect for SpelledOut {
        fn spells_out_null_logic(&self) -> bool {
            true
        }
    }

    #[test]
    fn null_logic_spelled_out_keeps_unknown_apart_from_false() {
        let render = |sql: &str| Filter::parse(sql).expect(sql).render(&SpelledOut);
        // Unknown where agent is NULL, so neither it nor its negation holds there.
        assert_eq!(render("agent = 'a'"), "isNotNull(agent) AND agent = 'a'");
        assert_eq!(
            render("NOT (agent = 'a')"),
            "isNotNull(agent) AND NOT (agent = 'a')"
        );
        assert_eq!(
            render("agent NOT IN ('a', 'b')"),
            "isNotNull(agent) AND agent NOT IN ('a', 'b')"
        );
        assert_eq!(
            render("NOT (agent IN ('a') OR status_code > 5)"),
            "(isNotNull(agent) AND agent NOT IN ('a')) AND (isNotNull(status_code) AND NOT (status_code > 5))"
        );
        assert_eq!(
            render("NOT (steps BETWEEN 1 AND 2) AND model IS NULL"),
            "(isNotNull(steps) AND (steps < 1 OR steps > 2)) AND (isNull(model))"
        );
        assert_eq!(render("NOT TRUE"), "FALSE");
    }

    #[test]
    fn anything_but_columns_and_plain_operators_is_refused() {
        for (sql, reason) in [
            ("nope = 1", "no column \"nope\""),
            ("time > 5", "is a time"),
            ("dimensions = 'x'", "is a map"),
            ("tenant = 1", "compares text with an integer"),
            ("status_code IN ('a')", "is an integer, but 'a' is text"),
            ("lower(tenant) = 'a'", "functions are not allowed"),
            ("tenant IN (SELECT tenant FROM events)", "subqueries"),
            ("EXISTS (SELECT 1)", "subqueries"),
            ("status_code + 1 > 2", "operator + is not allowed"),
            ("tenant LIKE 'a%'", "is not allowed"),
            ("1 = 1", "two constants"),
            ("tenant", "not a condition"),
            ("tenant = 'a'; DROP TABLE events", "ends at"),
            ("duration_ms > 1.5", "not a 64-bit integer"),
            ("duration_ms > 99999999999999999999", "not a 64-bit integer"),
        ] {
            let e = Filter::parse(sql).expect_err(sql).to_string();
            assert!(e.contains(reason), "{sql}: {e}");
        }
        let deep = format!("{}tenant = 'a'{}", "(".repeat(200), ")".repeat(200));
        assert!(Filter::parse(&deep).is_err());
        assert!(Filter::parse(&"tenant = 'a' AND ".repeat(1000)).is_err());
    }
}
