//! Limits on the shape of a statement, checked before it is planned.
//!
//! DataFusion plans and optimizes by recursion over the statement's tree, and the time it takes
//! grows faster than linearly with the width of a projection. A 2 KB chain of `1+1+...+1` or a
//! 1 MB list of select items is enough to exhaust a thread's stack or keep the query thread busy
//! for minutes. These checks bound the size (bytes and tokens, counted without recursion) and
//! then the depth (nesting of expressions and subqueries, the number of set operations and joins)
//! and the width (items of one `SELECT` or `VALUES` row), each with an error that names the
//! limit. The numbers follow ClickHouse's own defaults (`max_query_size`, `max_ast_depth`,
//! `max_ast_elements`), which analysts already meet in practice.

use std::collections::HashMap;
use std::ops::ControlFlow;

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::ast::{
    Expr, ObjectName, Query, Select, SetExpr, Statement, Visit, Visitor,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::ParserError;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Error, Result};

/// The most bytes a statement may have (ClickHouse's `max_query_size`).
pub(crate) const MAX_STATEMENT_BYTES: usize = 256 * 1024;
/// The most tokens (words, literals, operators, punctuation) a statement may have.
pub(crate) const MAX_STATEMENT_TOKENS: usize = 50_000;
/// The deepest nesting of expressions and subqueries (ClickHouse's `max_ast_depth`). A chain
/// `a OR b OR c` nests one level per operator.
pub(crate) const MAX_NESTING_DEPTH: usize = 1_000;
/// The most `UNION`, `INTERSECT` and `EXCEPT` operators in a statement.
pub(crate) const MAX_SET_OPERATIONS: usize = 256;
/// The most `JOIN`s in a statement.
pub(crate) const MAX_JOINS: usize = 256;
/// The most items in one `SELECT` list or `VALUES` row.
pub(crate) const MAX_COLUMNS: usize = 1_000;
/// The most table references, each use of a `WITH` query counted as the references it holds
/// (DataFusion plans a copy of it for each use, so `t1 AS (SELECT ... FROM t0 a, t0 b)`
/// doubles the plan at every step).
pub(crate) const MAX_RELATIONS: u64 = 1_000;
/// The most `[` tokens, and the most `<` that open a type (`ARRAY<`, `STRUCT<`, `MAP<`): array
/// types and literals nest without limit in the parser and in the type conversions after it.
/// A `<` that compares is not counted.
pub(crate) const MAX_BRACKETS: usize = 1_000;

/// Checks the size of `sql` before it is parsed: bytes, then tokens and the operators that
/// nest without parentheses. Linear and without recursion, so it is safe on any input.
pub(crate) fn check_text(sql: &str) -> Result<()> {
    if sql.len() > MAX_STATEMENT_BYTES {
        return Err(too_large("bytes", sql.len(), MAX_STATEMENT_BYTES));
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| {
            Error::Parse(DataFusionError::SQL(
                Box::new(ParserError::TokenizerError(e.to_string())),
                None,
            ))
        })?;
    let mut count = 0usize;
    let mut set_operations = 0usize;
    let mut joins = 0usize;
    let mut brackets = 0usize;
    let mut angles = 0usize;
    let mut previous: Option<&Token> = None;
    for token in &tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::LBracket => brackets += 1,
            Token::Lt if previous.is_some_and(opens_type) => angles += 1,
            Token::Word(word) => match word.keyword {
                Keyword::UNION | Keyword::INTERSECT | Keyword::EXCEPT => set_operations += 1,
                Keyword::JOIN => joins += 1,
                _ => {}
            },
            _ => {}
        }
        previous = Some(token);
        count += 1;
    }
    if count > MAX_STATEMENT_TOKENS {
        return Err(too_large("tokens", count, MAX_STATEMENT_TOKENS));
    }
    if set_operations > MAX_SET_OPERATIONS {
        return Err(too_large(
            "UNION, INTERSECT and EXCEPT operators",
            set_operations,
            MAX_SET_OPERATIONS,
        ));
    }
    if joins > MAX_JOINS {
        return Err(too_large("joins", joins, MAX_JOINS));
    }
    if brackets > MAX_BRACKETS {
        return Err(too_large("[ brackets", brackets, MAX_BRACKETS));
    }
    if angles > MAX_BRACKETS {
        return Err(too_large(
            "nested types (ARRAY<, STRUCT<, MAP<)",
            angles,
            MAX_BRACKETS,
        ));
    }
    Ok(())
}

/// Whether a `<` after `token` opens the parameters of a type.
fn opens_type(token: &Token) -> bool {
    matches!(
        token,
        Token::Word(word) if word.quote_style.is_none()
            && matches!(word.keyword, Keyword::ARRAY | Keyword::STRUCT | Keyword::MAP
                | Keyword::NULLABLE | Keyword::LOWCARDINALITY | Keyword::TUPLE)
    )
}

/// Checks the parsed statement's nesting depth and widths. The walk stops as soon as a limit is
/// passed, so its own recursion never goes deeper than [`MAX_NESTING_DEPTH`].
pub(crate) fn check_tree(statement: &Statement) -> Result<()> {
    let mut shape = Shape::default();
    if let ControlFlow::Break(e) = statement.visit(&mut shape) {
        return Err(e);
    }
    // Depth is bounded now, so these walks are too.
    let mut weights = CteWeights::default();
    let _ = statement.visit(&mut weights);
    let mut count = Relations {
        weights: &weights.0,
        total: 0,
    };
    let _ = statement.visit(&mut count);
    if count.total > MAX_RELATIONS {
        return Err(Error::TooComplex {
            what: "table references (each use of a WITH query counts the references in it)",
            found: usize::try_from(count.total).unwrap_or(usize::MAX),
            limit: MAX_RELATIONS as usize,
        });
    }
    Ok(())
}

/// How a table reference reads in a `WITH` definition and where it is used.
fn relation_key(name: &str) -> String {
    name.trim_matches(['"', '`']).to_lowercase()
}

/// The weight of each `WITH` query: the table references in it, each use of an earlier `WITH`
/// query counted at that query's weight.
#[derive(Debug, Default)]
struct CteWeights(HashMap<String, u64>);

impl Visitor for CteWeights {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                let mut count = Relations {
                    weights: &self.0,
                    total: 0,
                };
                let _ = cte.query.visit(&mut count);
                let weight = count.total.max(1);
                self.0.insert(relation_key(&cte.alias.name.value), weight);
            }
        }
        ControlFlow::Continue(())
    }
}

/// Counts table references, a `WITH` query's name at its weight.
#[derive(Debug)]
struct Relations<'a> {
    weights: &'a HashMap<String, u64>,
    total: u64,
}

impl Visitor for Relations<'_> {
    type Break = ();

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        let weight = self
            .weights
            .get(&relation_key(&relation.to_string()))
            .copied()
            .unwrap_or(1);
        self.total = self.total.saturating_add(weight);
        ControlFlow::Continue(())
    }
}

fn too_large(what: &'static str, found: usize, limit: usize) -> Error {
    Error::TooComplex { what, found, limit }
}

#[derive(Debug, Default)]
struct Shape {
    depth: usize,
}

impl Shape {
    fn enter(&mut self) -> ControlFlow<Error> {
        self.depth += 1;
        if self.depth > MAX_NESTING_DEPTH {
            return ControlFlow::Break(Error::TooDeep {
                limit: MAX_NESTING_DEPTH,
            });
        }
        ControlFlow::Continue(())
    }

    fn leave(&mut self) -> ControlFlow<Error> {
        self.depth = self.depth.saturating_sub(1);
        ControlFlow::Continue(())
    }
}

impl Visitor for Shape {
    type Break = Error;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Error> {
        if let SetExpr::Values(values) = query.body.as_ref()
            && let Some(row) = values.rows.iter().find(|row| row.len() > MAX_COLUMNS)
        {
            return ControlFlow::Break(too_large("items in a VALUES row", row.len(), MAX_COLUMNS));
        }
        self.enter()
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<Error> {
        self.leave()
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<Error> {
        let items = select.projection.len();
        if items > MAX_COLUMNS {
            return ControlFlow::Break(too_large("items in a SELECT list", items, MAX_COLUMNS));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Error> {
        self.enter()
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<Error> {
        self.leave()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> Statement {
        let mut statements =
            datafusion::sql::sqlparser::parser::Parser::parse_sql(&GenericDialect {}, sql)
                .expect("parses");
        statements.remove(0)
    }

    fn chain(op: &str, terms: usize) -> String {
        format!("SELECT {}", vec!["1"; terms].join(op))
    }

    #[test]
    fn ordinary_statements_pass() {
        for sql in [
            "SELECT tenant, sum(input_tokens) FROM events WHERE time > now() - INTERVAL '1 day' GROUP BY 1",
            &chain(" + ", 900),
            &chain(" OR ", 900),
        ] {
            check_text(sql).unwrap_or_else(|e| panic!("{e}"));
            check_tree(&parse(sql)).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn limits_name_themselves() {
        let long = format!("SELECT '{}'", "x".repeat(MAX_STATEMENT_BYTES));
        assert!(
            check_text(&long)
                .expect_err("refused")
                .to_string()
                .contains("bytes, more than the limit of 262144")
        );
        let many = vec!["1"; MAX_STATEMENT_TOKENS].join(",");
        let message = check_text(&format!("SELECT {many}"))
            .expect_err("refused")
            .to_string();
        assert!(message.contains("tokens"), "{message}");
        let unions = vec!["SELECT 1"; MAX_SET_OPERATIONS + 2].join(" UNION ALL ");
        let message = check_text(&unions).expect_err("refused").to_string();
        assert!(message.contains("UNION"), "{message}");

        let deep = chain(" + ", MAX_NESTING_DEPTH + 5);
        check_text(&deep).expect("small enough as text");
        let message = check_tree(&parse(&deep)).expect_err("refused").to_string();
        assert!(message.contains("nested deeper than 1000"), "{message}");

        let wide = format!(
            "SELECT {}",
            (0..=MAX_COLUMNS)
                .map(|i| format!("{i} AS c{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let message = check_tree(&parse(&wide)).expect_err("refused").to_string();
        assert!(message.contains("items in a SELECT list"), "{message}");

        // Each WITH query used twice by the next: 2^40 copies in the plan, in 1 KB of text.
        let mut doubling = "WITH t0 AS (SELECT 1 AS x)".to_owned();
        for i in 1..=40 {
            doubling.push_str(&format!(
                ", t{i} AS (SELECT a.x FROM t{p} a, t{p} b)",
                p = i - 1
            ));
        }
        doubling.push_str(" SELECT count(*) FROM t40");
        check_text(&doubling).expect("small as text");
        let message = check_tree(&parse(&doubling))
            .expect_err("refused")
            .to_string();
        assert!(message.contains("table references"), "{message}");
        let reuse = "WITH t AS (SELECT 1 AS x) SELECT * FROM t a JOIN t b ON a.x = b.x";
        check_tree(&parse(reuse)).expect("a WITH query used twice");

        let nested_type = format!("SELECT CAST(NULL AS INT{})", "[]".repeat(2_000));
        let message = check_text(&nested_type).expect_err("refused").to_string();
        assert!(message.contains("brackets"), "{message}");
        let nested_type = format!(
            "SELECT CAST(NULL AS {}INT{})",
            "ARRAY<".repeat(2_000),
            ">".repeat(2_000)
        );
        let message = check_text(&nested_type).expect_err("refused").to_string();
        assert!(message.contains("nested types"), "{message}");
        // Comparisons are not types: a generated filter of 2,000 of them is fine as text.
        let comparisons = format!(
            "SELECT count(*) FROM events WHERE {}",
            (0..2_000)
                .map(|i| format!("(input_tokens < {i} AND output_tokens > {i})"))
                .collect::<Vec<_>>()
                .join(" OR ")
        );
        check_text(&comparisons).expect("comparisons are not nested types");
    }
}
