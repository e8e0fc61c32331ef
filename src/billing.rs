//! The billing API: `GET /v1/meters`, `GET /v1/invoices`, `POST /v1/invoices/preview`, over
//! the usage source of the SQL source (the embedded store through DataFusion, or PostgreSQL or
//! ClickHouse, each running the meters' aggregations itself).

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use meterd_billing::config::{PlanConfig, PriceEntry};
use meterd_billing::filter::FilterDialect;
use meterd_billing::invoice::{Status, Terms};
use meterd_billing::usage::{UsageQuery, meter_windows};
use meterd_billing::{
    Answer, Billing, ClosedStore, Closing, Invoice, InvoiceError, Period, PriceBook, UsageDialect,
    UsageError, UsageSource, WindowSize, Windows,
};
use meterd_query::QueryService;
use meterd_schemas::Principal;
use serde::Deserialize;
use serde_json::json;

/// DataFusion's spelling of a usage statement, over the embedded store's `events`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DataFusionDialect;

impl FilterDialect for DataFusionDialect {}

impl UsageDialect for DataFusionDialect {
    /// Text literals of UTC instants compare with `time` exactly, to the microsecond.
    fn time_range(&self, from_us: i64, to_us: i64) -> String {
        let at = |us: i64| {
            Utc.timestamp_micros(us)
                .single()
                .unwrap_or_default()
                .to_rfc3339_opts(SecondsFormat::Micros, true)
        };
        format!("time >= '{}' AND time < '{}'", at(from_us), at(to_us))
    }

    /// meterd's `sum` is exact (a 128-bit decimal; see query's exact_sum).
    fn sum(&self, column: &str) -> String {
        format!("CAST(sum({column}) AS VARCHAR)")
    }

    fn latest(&self, column: &str) -> String {
        format!(
            "CAST(first_value({column} ORDER BY time DESC, id DESC) \
             FILTER (WHERE {column} IS NOT NULL) AS VARCHAR)"
        )
    }

    /// A microsecond timestamp cast to an integer is its microseconds since 1970.
    fn time_us(&self) -> String {
        "CAST(time AS BIGINT)".to_owned()
    }
}

/// Usage from the embedded store, through the SQL API's engine and limits.
#[derive(Debug)]
pub struct EmbeddedUsage(pub Arc<QueryService>);

#[async_trait]
impl UsageSource for EmbeddedUsage {
    fn name(&self) -> &str {
        "embedded"
    }

    fn dialect(&self) -> &dyn UsageDialect {
        &DataFusionDialect
    }

    async fn rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>, UsageError> {
        let failed = |message: String| UsageError::Store {
            store: "embedded".to_owned(),
            message,
        };
        let (_, batches) = self.0.query(sql).await.map_err(|e| match e {
            // The SQL API's row cap, which may be below meterd's own for usage answers.
            meterd_query::Error::TooManyRows { max_rows } => UsageError::TooManyRows(max_rows),
            e => failed(e.to_string()),
        })?;
        let mut rows = Vec::new();
        for batch in batches {
            let columns = batch
                .columns()
                .iter()
                .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| failed(e.to_string()))?;
            for row in 0..batch.num_rows() {
                rows.push(
                    columns
                        .iter()
                        .map(|c| {
                            let strings = arrow::array::AsArray::as_string::<i32>(c.as_ref());
                            arrow::array::Array::is_valid(strings, row)
                                .then(|| strings.value(row).to_owned())
                        })
                        .collect(),
                );
            }
        }
        Ok(rows)
    }
}

#[derive(Debug, Clone)]
struct BillingState {
    billing: Arc<Billing>,
    source: Arc<dyn UsageSource>,
    closed: Arc<dyn ClosedStore>,
    metrics: meterd_billing::metrics::BillingMetrics,
    /// How long one request may read usage, all its statements together.
    deadline: std::time::Duration,
}

impl BillingState {
    /// Runs `work` within the request's deadline; past it, a 504.
    async fn within<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, InvoiceError>>,
    ) -> Result<T, Response> {
        match tokio::time::timeout(self.deadline, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(invoice_error(e)),
            Err(_) => Err(error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "reading usage took longer than {}s",
                    self.deadline.as_secs()
                ),
            )),
        }
    }
}

/// The billing routes, with their state applied.
pub fn router(
    billing: Arc<Billing>,
    source: Arc<dyn UsageSource>,
    closed: Arc<dyn ClosedStore>,
    metrics: meterd_billing::metrics::BillingMetrics,
    deadline: std::time::Duration,
) -> Router {
    Router::new()
        .route("/v1/meters", get(meters))
        .route("/v1/usage", get(usage))
        .route("/v1/invoices", get(invoice))
        .route("/v1/invoices/preview", post(preview))
        .route("/v1/periods/{period}/close", post(close))
        .with_state(BillingState {
            billing,
            source,
            closed,
            metrics,
            deadline,
        })
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    Refusal::new(status, message).into_response()
}

/// A request refused before any work, with the status and the message to answer.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

fn invoice_error(e: InvoiceError) -> Response {
    error(invoice_error_status(&e), e.to_string())
}

fn invoice_error_status(e: &InvoiceError) -> StatusCode {
    match e {
        InvoiceError::UnknownTenant(_) => StatusCode::NOT_FOUND,
        InvoiceError::Unpriced { .. } | InvoiceError::Overflow { .. } => StatusCode::CONFLICT,
        InvoiceError::Usage(UsageError::Store { message, .. }) if timed_out(message) => {
            StatusCode::GATEWAY_TIMEOUT
        }
        InvoiceError::Usage(UsageError::Value { .. }) => StatusCode::CONFLICT,
        InvoiceError::Usage(UsageError::TooManyRows(_)) => StatusCode::PAYLOAD_TOO_LARGE,
        InvoiceError::Usage(_) | InvoiceError::Closed(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Whether a store's error says the statement ran out of time: the SQL API's timeout,
/// PostgreSQL's `statement_timeout` (57014), ClickHouse's `max_execution_time` (159).
fn timed_out(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("timeout") || m.contains("timed out") || m.contains("code: 159")
}

async fn meters(State(state): State<BillingState>) -> Response {
    let meters: Vec<_> = state.billing.meters.iter().map(|m| m.describe()).collect();
    axum::Json(json!({ "meters": meters })).into_response()
}

/// `GET /v1/usage`: a meter's values per window of a zone's clock, optionally split by
/// columns, as OpenMeter's meter query answers them.
#[derive(Debug, Deserialize)]
struct UsageParams {
    meter: Option<String>,
    tenant: Option<String>,
    from: Option<String>,
    to: Option<String>,
    window: Option<String>,
    tz: Option<String>,
    /// Comma-separated column names: `tenant` or the meter's `group_by` columns.
    group_by: Option<String>,
}

/// The most `group_by` columns one request may name.
const MAX_USAGE_GROUP_BY: usize = 8;

fn stamp(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// An RFC 3339 instant of the years meterd stores (1970 to 9999), to the microsecond.
fn instant(field: &str, text: &str) -> Result<chrono::DateTime<Utc>, Refusal> {
    let bad = |why: String| Refusal::new(StatusCode::BAD_REQUEST, format!("{field}: {why}"));
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .map_err(|e| bad(format!("{text:?} is not an RFC 3339 instant ({e})")))?
        .with_timezone(&Utc);
    let earliest = Utc.timestamp_opt(0, 0).single().unwrap_or_default();
    let latest = Utc
        .with_ymd_and_hms(9999, 12, 31, 0, 0, 0)
        .single()
        .unwrap_or_default();
    if t < earliest || t > latest {
        return Err(bad(format!("{text:?} is outside 1970 to 9999")));
    }
    Utc.timestamp_micros(t.timestamp_micros())
        .single()
        .ok_or_else(|| bad(format!("{text:?} is outside 1970 to 9999")))
}

/// What a usage request asks, checked before any work.
struct UsageAsk<'a> {
    meter: &'a meterd_billing::Meter,
    tenant: Option<String>,
    from: chrono::DateTime<Utc>,
    to: chrono::DateTime<Utc>,
    tz: Tz,
    window: Option<(WindowSize, Windows)>,
    group_by: Vec<&'static meterd_schemas::columns::Column>,
}

fn usage_ask<'a>(
    billing: &'a Billing,
    principal: Option<&Principal>,
    params: UsageParams,
) -> Result<UsageAsk<'a>, Refusal> {
    let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, message);
    let name = params
        .meter
        .filter(|m| !m.is_empty())
        .ok_or_else(|| bad("meter: required, the name of a meter".to_owned()))?;
    let meter = billing.meter(&name).ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            format!("meter: there is no meter named {name:?}"),
        )
    })?;
    let tenant = match (params.tenant, principal.and_then(|p| p.tenant.clone())) {
        (Some(t), _) if t.is_empty() => {
            return Err(bad(
                "tenant: empty; leave it out for every tenant's usage".to_owned()
            ));
        }
        (Some(t), _) if t.len() > 128 => {
            return Err(bad(format!("tenant: {} bytes, more than 128", t.len())));
        }
        (Some(t), Some(bound)) if t != bound => {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!("this API key is bound to another tenant than {t:?}"),
            ));
        }
        (Some(t), _) => Some(t),
        // A key bound to a tenant reads that tenant's usage only.
        (None, bound) => bound,
    };
    let from = instant(
        "from",
        params
            .from
            .as_deref()
            .ok_or_else(|| bad("from: required, an RFC 3339 instant".to_owned()))?,
    )?;
    let to = match params.to.as_deref() {
        Some(t) => instant("to", t)?,
        None => Utc
            .timestamp_micros(Utc::now().timestamp_micros())
            .single()
            .unwrap_or_default(),
    };
    if from >= to {
        return Err(bad(format!(
            "from: {} is not before to ({})",
            stamp(from),
            stamp(to)
        )));
    }
    let tz = match params.tz.as_deref() {
        None | Some("") => Tz::UTC,
        Some(z) => z
            .parse::<Tz>()
            .map_err(|_| bad(format!("tz: {z:?} is not an IANA zone")))?,
    };
    let window = match params.window.as_deref() {
        None | Some("") => None,
        Some(w) => {
            let size = w
                .parse::<WindowSize>()
                .map_err(|e| bad(format!("window: {e}")))?;
            let windows =
                Windows::new(size, tz, from, to).map_err(|e| bad(format!("window: {e}")))?;
            Some((size, windows))
        }
    };
    let mut group_by = Vec::new();
    for name in params
        .group_by
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let column = meter
            .group_by
            .iter()
            .copied()
            .find(|c| c.name == name)
            .or_else(|| {
                (name == "tenant")
                    .then(|| meterd_billing::filter::filter_column("tenant").ok())
                    .flatten()
            })
            .ok_or_else(|| {
                let mut allowed: Vec<_> = meter.group_by.iter().map(|c| c.name).collect();
                allowed.push("tenant");
                bad(format!(
                    "group_by: meter {:?} is not grouped by {name:?} (it may be: {})",
                    meter.name,
                    allowed.join(", ")
                ))
            })?;
        if !group_by
            .iter()
            .any(|c: &&meterd_schemas::columns::Column| c.name == column.name)
        {
            group_by.push(column);
        }
        if group_by.len() > MAX_USAGE_GROUP_BY {
            return Err(bad(format!(
                "group_by: more than {MAX_USAGE_GROUP_BY} columns"
            )));
        }
    }
    Ok(UsageAsk {
        meter,
        tenant,
        from,
        to,
        tz,
        window,
        group_by,
    })
}

async fn usage(
    State(state): State<BillingState>,
    principal: Option<axum::Extension<Principal>>,
    params: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let ask = match usage_ask(&state.billing, principal.as_deref(), params) {
        Ok(ask) => ask,
        Err(r) => return r.into_response(),
    };
    let query = UsageQuery {
        meter: ask.meter,
        tenants: ask.tenant.as_deref().map_or(
            meterd_billing::usage::Tenants::All,
            meterd_billing::usage::Tenants::One,
        ),
        from_us: ask.from.timestamp_micros(),
        to_us: ask.to.timestamp_micros(),
        windows: ask.window.as_ref().map(|(_, w)| w),
        group_by: &ask.group_by,
    };
    let rows = match state
        .within(async {
            meter_windows(state.source.as_ref(), query)
                .await
                .map_err(InvoiceError::Usage)
        })
        .await
    {
        Ok(rows) => rows,
        Err(r) => return r,
    };
    let data: Vec<_> = rows
        .into_iter()
        .map(|row| {
            // The first and last windows are counted within from and to only.
            let (start, end) = match &ask.window {
                Some((_, windows)) => windows
                    .get(row.window)
                    .map(|(a, b)| (a.max(ask.from), b.min(ask.to)))
                    .unwrap_or((ask.from, ask.to)),
                None => (ask.from, ask.to),
            };
            let groups: serde_json::Map<_, _> = ask
                .group_by
                .iter()
                .zip(row.groups)
                .map(|(c, v)| (c.name.to_owned(), json!(v)))
                .collect();
            json!({
                "window_start": stamp(start),
                "window_end": stamp(end),
                "group_by": groups,
                "events": row.value.events,
                "value": row.value.value,
            })
        })
        .collect();
    axum::Json(json!({
        "meter": ask.meter.name,
        "aggregation": ask.meter.aggregation.as_str(),
        "tenant": ask.tenant,
        "from": stamp(ask.from),
        "to": stamp(ask.to),
        "window": ask.window.as_ref().map(|(size, _)| size.as_str()),
        "tz": ask.tz.name(),
        "group_by": ask.group_by.iter().map(|c| c.name).collect::<Vec<_>>(),
        "source": state.source.name(),
        "data": data,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct InvoiceParams {
    tenant: Option<String>,
    period: Option<String>,
    format: Option<String>,
}

/// A key bound to a tenant reads that tenant's invoices only.
fn allowed(principal: Option<&Principal>, tenant: &str) -> Result<(), Refusal> {
    match principal.and_then(|p| p.tenant.as_deref()) {
        Some(bound) if bound != tenant => Err(Refusal::new(
            StatusCode::FORBIDDEN,
            format!("this API key is bound to another tenant than {tenant:?}"),
        )),
        _ => Ok(()),
    }
}

fn tenant_and_period(
    tenant: Option<String>,
    period: Option<&str>,
) -> Result<(String, Period), Refusal> {
    let tenant = tenant
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Refusal::new(StatusCode::BAD_REQUEST, "tenant: required"))?;
    if tenant.len() > 128 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("tenant: {} bytes, more than 128", tenant.len()),
        ));
    }
    let period = period
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "period: required, a month such as 2026-10",
            )
        })?
        .parse::<Period>()
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("period: {e}")))?;
    Ok((tenant, period))
}

async fn invoice(
    State(state): State<BillingState>,
    principal: Option<axum::Extension<Principal>>,
    params: Result<Query<InvoiceParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let csv = match params.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("format: {other:?} is not json or csv"),
            );
        }
    };
    // A key bound to a tenant asks for that tenant's invoice; any other key without a tenant
    // asks for every customer's: the invoice run.
    let bound = principal.as_deref().and_then(|p| p.tenant.clone());
    if params.tenant.as_deref() == Some("") {
        return error(
            StatusCode::BAD_REQUEST,
            "tenant: empty; leave it out for every customer's invoice",
        );
    }
    let tenant = params.tenant.or(bound);
    if tenant.is_none() {
        let period = match tenant_and_period(Some("-".to_owned()), params.period.as_deref()) {
            Ok((_, period)) => period,
            Err(r) => return r.into_response(),
        };
        return invoice_run(&state, period, csv).await;
    }
    let (tenant, period) = match tenant_and_period(tenant, params.period.as_deref()) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = allowed(principal.as_deref(), &tenant) {
        return r.into_response();
    }
    let answer = match state
        .within(state.billing.invoice(
            state.source.as_ref(),
            state.closed.as_ref(),
            &tenant,
            period,
        ))
        .await
    {
        Ok(answer) => answer,
        Err(r) => return r,
    };
    let invoice = match answer {
        // A closed invoice is answered as it was stored, byte for byte.
        Answer::Closed(body) if !csv => {
            return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
        }
        Answer::Closed(body) => match serde_json::from_slice::<Invoice>(&body) {
            Ok(invoice) => invoice,
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the closed invoice does not read back: {e}"),
                );
            }
        },
        Answer::Draft(invoice) => *invoice,
    };
    if csv {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            invoice.lines_csv(),
        )
            .into_response()
    } else {
        axum::Json(invoice).into_response()
    }
}

/// Every customer's invoice for `period`, the usage of all read at once: `{"period",
/// "invoices": [...], "errors": [...]}` with closed invoices as they were stored and, for each
/// customer whose invoice could not be made, its status and why; or every line as CSV, which
/// has no place for errors, so there any error answers the whole request.
async fn invoice_run(state: &BillingState, period: Period, csv: bool) -> Response {
    let tenants: Vec<String> = state.billing.customers.keys().cloned().collect();
    let answers = match state
        .within(async {
            Ok(state
                .billing
                .invoices(
                    state.source.as_ref(),
                    state.closed.as_ref(),
                    &tenants,
                    period,
                )
                .await)
        })
        .await
    {
        Ok(answers) => answers,
        Err(r) => return r,
    };
    let mut bodies: Vec<Vec<u8>> = Vec::with_capacity(answers.len());
    let mut errors = Vec::new();
    let mut lines = String::new();
    for (tenant, answer) in answers {
        let answer = match answer {
            Ok(a) => a,
            Err(e) if csv => {
                return error(
                    invoice_error_status(&e),
                    format!("the invoice of {tenant:?}: {e}"),
                );
            }
            Err(e) => {
                errors.push(json!({
                    "tenant": tenant,
                    "status": invoice_error_status(&e).as_u16(),
                    "error": e.to_string(),
                }));
                continue;
            }
        };
        if csv {
            let invoice = match answer {
                Answer::Closed(body) => match serde_json::from_slice::<Invoice>(&body) {
                    Ok(i) => i,
                    Err(e) => {
                        return error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("the closed invoice of {tenant:?} does not read back: {e}"),
                        );
                    }
                },
                Answer::Draft(invoice) => *invoice,
            };
            let text = invoice.lines_csv();
            // One header for the whole run.
            let rows = if lines.is_empty() {
                text.as_str()
            } else {
                text.split_once('\n').map_or("", |(_, rows)| rows)
            };
            lines.push_str(rows);
        } else {
            bodies.push(match answer {
                Answer::Closed(body) => body,
                Answer::Draft(invoice) => match serde_json::to_vec(&invoice) {
                    Ok(body) => body,
                    Err(e) => {
                        errors.push(json!({
                            "tenant": tenant,
                            "status": 500,
                            "error": format!("encoding the invoice: {e}"),
                        }));
                        continue;
                    }
                },
            });
        }
    }
    if csv {
        return ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], lines).into_response();
    }
    // Closed invoices go out byte for byte, so the document is put together here.
    let mut body = format!("{{\"period\":\"{period}\",\"invoices\":[").into_bytes();
    for (i, b) in bodies.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b);
    }
    body.extend_from_slice(b"],\"errors\":");
    body.extend_from_slice(serde_json::Value::Array(errors).to_string().as_bytes());
    body.push(b'}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `POST /v1/periods/{period}/close`: freezes the period's invoice of every customer whose
/// period has ended in its zone (or of `?tenant=` only).
#[derive(Debug, Deserialize)]
struct CloseParams {
    tenant: Option<String>,
}

async fn close(
    State(state): State<BillingState>,
    principal: Option<axum::Extension<Principal>>,
    axum::extract::Path(period): axum::extract::Path<String>,
    params: Result<Query<CloseParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let period = match period.parse::<Period>() {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("period: {e}")),
    };
    if principal.as_deref().is_some_and(|p| p.tenant.is_some()) {
        return error(
            StatusCode::FORBIDDEN,
            "closing a period is for keys not bound to a tenant",
        );
    }
    let tenants: Vec<String> = match params.tenant {
        Some(t) if !state.billing.customers.contains_key(&t) => {
            return invoice_error(InvoiceError::UnknownTenant(t));
        }
        Some(t) => vec![t],
        None => state.billing.customers.keys().cloned().collect(),
    };
    let now = Utc::now();
    // Not cut off at the read deadline: each statement has its own time limit, and a close
    // stopped half way would leave part of the run closed.
    let outcomes = state
        .billing
        .close_many(
            state.source.as_ref(),
            state.closed.as_ref(),
            &tenants,
            period,
            now,
        )
        .await;
    state.metrics.closings(outcomes.iter().map(|(_, o)| o));
    let (mut closed, mut already, mut not_ended) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = None;
    for (tenant, outcome) in outcomes {
        match outcome {
            Ok(Closing::Closed(_)) => closed.push(tenant),
            Ok(Closing::AlreadyClosed(_)) => already.push(tenant),
            Ok(Closing::NotEnded) => not_ended.push(tenant),
            Err(e) => {
                failed.get_or_insert((tenant, e));
            }
        }
    }
    if let Some((tenant, e)) = failed {
        let message = format!(
            "closing {period} for {tenant:?}: {e} (closed now: {closed:?}; closing again \
             finishes the rest)"
        );
        return error(invoice_error_status(&e), message);
    }
    axum::Json(json!({
        "period": period.to_string(),
        "closed": closed,
        "already_closed": already,
        "not_ended": not_ended,
    }))
    .into_response()
}

/// The most price entries a preview may give: each distinct `effective_from` cuts the month
/// into one more stretch read from the store.
const MAX_PREVIEW_PRICES: usize = 256;

/// `POST /v1/invoices/preview`: the invoice a plan or a price book would give; nothing changes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    tenant: String,
    period: String,
    /// Default: the tenant's plan. Read after the request's shape, so a bad plan is a 400
    /// naming what is wrong with it.
    plan: Option<serde_json::Value>,
    /// Default: the configured price book.
    prices: Option<serde_json::Value>,
    /// Default: the tenant's zone, or UTC for a tenant that is not a customer.
    timezone: Option<String>,
}

async fn preview(
    State(state): State<BillingState>,
    principal: Option<axum::Extension<Principal>>,
    body: Result<axum::Json<PreviewRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(request) = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let (tenant, period) = match tenant_and_period(Some(request.tenant), Some(&request.period)) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = allowed(principal.as_deref(), &tenant) {
        return r.into_response();
    }
    let billing = &state.billing;
    let customer = billing.customers.get(&tenant);
    let entries = match request
        .prices
        .map(serde_json::from_value::<Vec<PriceEntry>>)
    {
        None => None,
        Some(Ok(entries)) if entries.len() > MAX_PREVIEW_PRICES => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "prices: {} entries, more than {MAX_PREVIEW_PRICES}",
                    entries.len()
                ),
            );
        }
        Some(Ok(entries)) => Some(entries),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("prices: {e}")),
    };
    let plan_config = match request.plan.map(serde_json::from_value::<PlanConfig>) {
        None => None,
        Some(Ok(plan)) => Some(plan),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("plan: {e}")),
    };
    let prices_owned;
    let prices = match &entries {
        Some(entries) => match PriceBook::new(entries) {
            Ok(book) => {
                prices_owned = book;
                &prices_owned
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        },
        None => &billing.prices,
    };
    let plan_owned;
    let plan = match (&plan_config, customer) {
        (Some(config), _) => match billing.plan_from(config, prices) {
            Ok(p) => {
                plan_owned = p;
                &plan_owned
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("plan: {e}")),
        },
        (None, Some(c)) => match billing.plans.get(c.plan) {
            Some(p) => {
                if let Some(other) = prices
                    .currencies()
                    .into_iter()
                    .find(|x| *x != p.currency.code())
                {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "prices: priced in {other}, and the plan of {tenant:?} bills in {}",
                            p.currency.code()
                        ),
                    );
                }
                p
            }
            None => return invoice_error(InvoiceError::UnknownTenant(tenant)),
        },
        (None, None) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("plan: required, as tenant {tenant:?} is not a customer"),
            );
        }
    };
    let tz = match (&request.timezone, customer) {
        (Some(z), _) => match z.parse::<Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("timezone: {z:?} is not an IANA zone"),
                );
            }
        },
        (None, Some(c)) => c.timezone,
        (None, None) => Tz::UTC,
    };
    let terms = Terms {
        plan,
        prices,
        status: Status::Preview,
    };
    match state
        .within(billing.preview(
            state.source.as_ref(),
            state.closed.as_ref(),
            &tenant,
            tz,
            period,
            terms,
        ))
        .await
    {
        Ok(invoice) => axum::Json(invoice).into_response(),
        Err(r) => r,
    }
}

/// Closes each customer's previous period once it has been over for `grace` in the customer's
/// zone; checks every minute until `stop` is cancelled. A failure (a store that does not
/// answer) is logged and tried again at the next check.
pub fn spawn_auto_close(
    billing: Arc<Billing>,
    source: Arc<dyn UsageSource>,
    closed: Arc<dyn ClosedStore>,
    metrics: meterd_billing::metrics::BillingMetrics,
    grace: chrono::Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Utc::now();
            // The customers whose previous period is due, by period (zones differ).
            let mut due: std::collections::BTreeMap<Period, Vec<String>> = Default::default();
            for (tenant, customer) in &billing.customers {
                let Some(period) = Period::containing(now, customer.timezone).previous() else {
                    continue;
                };
                if now >= period.end(customer.timezone) + grace {
                    due.entry(period).or_default().push(tenant.clone());
                }
            }
            for (period, tenants) in due {
                let outcomes = billing
                    .close_many(source.as_ref(), closed.as_ref(), &tenants, period, now)
                    .await;
                metrics.closings(outcomes.iter().map(|(_, o)| o));
                for (tenant, outcome) in outcomes {
                    match outcome {
                        Ok(Closing::Closed(_)) => {
                            tracing::info!(%tenant, %period, "closed the billing period");
                        }
                        Ok(Closing::AlreadyClosed(_) | Closing::NotEnded) => {}
                        Err(e) => tracing::warn!(
                            %tenant,
                            %period,
                            error = %e,
                            "closing the billing period failed; trying again in a minute"
                        ),
                    }
                }
            }
        }
    })
}
