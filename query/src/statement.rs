//! The read-only guard at the parser level: exactly one statement, and only one that reads.
//!
//! This is the first of two guards; the planned statement is checked again with `SQLOptions`
//! (no DDL, DML or session statements), so a statement form this walk does not know about is
//! still refused before it runs.

use datafusion::sql::parser::{DFParserBuilder, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Query, SetExpr, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;

use crate::error::{Error, Result};

/// Parses `sql` and returns its single statement if it only reads and stays within the
/// limits of [`crate::bounds`].
pub(crate) fn parse_read_only(sql: &str, recursion_limit: usize) -> Result<DFStatement> {
    crate::bounds::check_text(sql)?;
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&GenericDialect {})
        .with_recursion_limit(recursion_limit)
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(Error::Parse)?;
    let count = statements.len();
    let (Some(statement), 1) = (statements.pop_front(), count) else {
        return Err(Error::StatementCount { count });
    };
    // Bounds first: refusing a statement formats it, which recurses over its whole tree.
    check_bounds(&statement)?;
    check(&statement)?;
    Ok(statement)
}

fn check_bounds(statement: &DFStatement) -> Result<()> {
    match statement {
        DFStatement::Statement(s) => crate::bounds::check_tree(s),
        DFStatement::Explain(explain) => check_bounds(&explain.statement),
        // Refused by `check`, which formats none of them.
        DFStatement::CreateExternalTable(_) | DFStatement::CopyTo(_) | DFStatement::Reset(_) => {
            Ok(())
        }
    }
}

fn refuse(kind: impl Into<String>) -> Error {
    Error::NotAllowed { kind: kind.into() }
}

fn check(statement: &DFStatement) -> Result<()> {
    match statement {
        DFStatement::Statement(s) => check_sql(s),
        // EXPLAIN ANALYZE runs its statement, so what it wraps must pass too.
        DFStatement::Explain(explain) => check(&explain.statement),
        DFStatement::CreateExternalTable(_) => Err(refuse("CREATE EXTERNAL TABLE")),
        DFStatement::CopyTo(_) => Err(refuse("COPY")),
        DFStatement::Reset(_) => Err(refuse("RESET")),
    }
}

fn check_sql(statement: &Statement) -> Result<()> {
    match statement {
        Statement::Query(query) => check_query(query),
        Statement::Explain { statement, .. } => check_sql(statement),
        Statement::ExplainTable { .. }
        | Statement::ShowTables { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowViews { .. } => Ok(()),
        other => Err(refuse(leading_keyword(&other.to_string()))),
    }
}

fn check_query(query: &Query) -> Result<()> {
    if let Some(with) = &query.with {
        for cte in &with.cte_tables {
            check_query(&cte.query)?;
        }
    }
    check_set_expr(&query.body)
}

fn check_set_expr(body: &SetExpr) -> Result<()> {
    match body {
        SetExpr::Select(select) if select.into.is_some() => Err(refuse("SELECT INTO")),
        SetExpr::Select(_) | SetExpr::Values(_) | SetExpr::Table(_) => Ok(()),
        SetExpr::Query(query) => check_query(query),
        SetExpr::SetOperation { left, right, .. } => {
            check_set_expr(left)?;
            check_set_expr(right)
        }
        SetExpr::Insert(_) => Err(refuse("INSERT")),
        SetExpr::Update(_) => Err(refuse("UPDATE")),
        SetExpr::Delete(_) => Err(refuse("DELETE")),
        SetExpr::Merge(_) => Err(refuse("MERGE")),
    }
}

/// `CREATE TABLE t (...)` -> `CREATE`: enough to tell the client what was refused without
/// echoing their whole statement back.
fn leading_keyword(statement: &str) -> String {
    statement
        .split_whitespace()
        .next()
        .unwrap_or("this")
        .to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> String {
        match parse_read_only(sql, 50) {
            Ok(s) => panic!("{sql:?} was accepted as {s}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn reading_statements_pass() {
        for sql in [
            "SELECT 1",
            "select * from events where tenant = 'a'",
            "WITH t AS (SELECT 1 AS x) SELECT x FROM t",
            "SELECT 1 UNION ALL SELECT 2",
            "EXPLAIN SELECT 1",
            "EXPLAIN ANALYZE SELECT 1",
            "SHOW TABLES",
            "SHOW COLUMNS FROM events",
            "SHOW ALL",
            "DESCRIBE events",
            "SELECT 1;",
        ] {
            parse_read_only(sql, 50).unwrap_or_else(|e| panic!("{sql:?} refused: {e}"));
        }
    }

    #[test]
    fn writing_statements_are_refused_by_name() {
        for (sql, kind) in [
            ("CREATE TABLE t (a INT)", "CREATE"),
            (
                "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp/x'",
                "CREATE EXTERNAL TABLE",
            ),
            ("DROP TABLE events", "DROP"),
            ("INSERT INTO events VALUES (1)", "INSERT"),
            ("UPDATE events SET tenant = 'x'", "UPDATE"),
            ("DELETE FROM events", "DELETE"),
            ("COPY events TO '/tmp/out.csv'", "COPY"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("RESET datafusion.execution.batch_size", "RESET"),
            ("EXPLAIN ANALYZE INSERT INTO events VALUES (1)", "INSERT"),
            ("SELECT * INTO t2 FROM events", "SELECT INTO"),
        ] {
            let message = refused(sql);
            assert!(
                message.starts_with(&format!("{kind} statements are not allowed")),
                "{sql:?}: {message}"
            );
        }
    }

    #[test]
    fn statement_count_must_be_one() {
        assert_eq!(
            refused("SELECT 1; SELECT 2"),
            "only one SELECT, WITH, EXPLAIN or SHOW statement per request; got 2 statements"
        );
        assert!(refused("").contains("got 0 statements"));
        assert!(refused("  ;  ").contains("got 0 statements"));
    }
}
