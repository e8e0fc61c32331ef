//! `GET /v1/slos`: each SLO's SLI, error budget, burn rates and alerts, counted by the store
//! that serves SQL at the time of the request.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use meterd_billing::UsageSource;
use meterd_schemas::Principal;
use meterd_slo::{Slo, SloScope, SloStatus};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone)]
struct SloState {
    slos: Arc<Vec<Slo>>,
    source: Arc<dyn UsageSource>,
    /// How long one request may count, all its SLOs together.
    deadline: std::time::Duration,
}

/// The SLO routes, with their state applied.
pub fn router(
    slos: Arc<Vec<Slo>>,
    source: Arc<dyn UsageSource>,
    deadline: std::time::Duration,
) -> Router {
    Router::new()
        .route("/v1/slos", get(slos_handler))
        .with_state(SloState {
            slos,
            source,
            deadline,
        })
}

#[derive(Debug, Deserialize)]
struct SloParams {
    name: Option<String>,
    tenant: Option<String>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

async fn slos_handler(
    State(state): State<SloState>,
    principal: Option<axum::Extension<Principal>>,
    params: Result<Query<SloParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let bound = principal.as_deref().and_then(|p| p.tenant.clone());
    let tenant = match (params.tenant, bound) {
        (Some(t), _) if t.is_empty() => {
            return error(
                StatusCode::BAD_REQUEST,
                "tenant: empty; leave it out for every SLO",
            );
        }
        (Some(t), _) if t.len() > 128 => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("tenant: {} bytes, more than 128", t.len()),
            );
        }
        (Some(t), Some(b)) if t != b => {
            return error(
                StatusCode::FORBIDDEN,
                format!("this API key is bound to another tenant than {t:?}"),
            );
        }
        (t, b) => t.or(b),
    };
    if let Some(name) = params.name.as_deref().filter(|n| !n.is_empty())
        && !state.slos.iter().any(|s| s.name == name)
    {
        return error(
            StatusCode::NOT_FOUND,
            format!("name: there is no SLO named {name:?}"),
        );
    }
    let chosen: Vec<&Slo> = state
        .slos
        .iter()
        .filter(|s| {
            params
                .name
                .as_deref()
                .is_none_or(|n| n.is_empty() || s.name == n)
        })
        // With a tenant, the SLOs that can speak of it: per tenant, or of that tenant.
        .filter(|s| match (&s.scope, tenant.as_deref()) {
            (_, None) => true,
            (SloScope::PerTenant, Some(_)) => true,
            (SloScope::Tenant(own), Some(t)) => own == t,
            (SloScope::All, Some(_)) => false,
        })
        .collect();
    let now_us = chrono::Utc::now().timestamp_micros();
    let work = async {
        let mut out: Vec<SloStatus> = Vec::new();
        for slo in chosen {
            out.extend(
                meterd_slo::evaluate(state.source.as_ref(), slo, now_us, tenant.as_deref()).await?,
            );
        }
        Ok::<_, meterd_billing::UsageError>(out)
    };
    match tokio::time::timeout(state.deadline, work).await {
        Ok(Ok(slos)) => axum::Json(json!({ "slos": slos })).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("counting took longer than {}s", state.deadline.as_secs()),
        ),
    }
}
