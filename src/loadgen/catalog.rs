//! The vocabularies generated events draw from, with weights and the medians their numbers
//! scatter around. Model and route names are the ones price books and dashboards key on.

use rand::Rng as _;
use rand::rngs::StdRng;

/// An LLM and the shape of its traffic.
#[derive(Debug)]
pub(super) struct Model {
    pub provider: &'static str,
    pub name: &'static str,
    pub weight: u32,
    pub input_median: f64,
    /// The context window: no request can be longer.
    pub max_input: u64,
    /// 0 for embedding models, which produce no tokens.
    pub output_median: f64,
    /// 0 for models that do not reason; they never report `reasoning_tokens`.
    pub reasoning_median: f64,
    /// Whether the provider reports `cached_input_tokens`.
    pub reports_cache: bool,
    pub first_token_ms: f64,
    pub ms_per_token: f64,
    pub ms_per_input_token: f64,
}

/// The providers of [`MODELS`]; a tenant favours one of them.
pub(super) const PROVIDERS: &[&str] = &["openai", "anthropic", "google", "mistral"];

pub(super) const MODELS: &[Model] = &[
    model(
        "openai", "gpt-4o", 16, 1800.0, 128_000, 350.0, 0.0, true, 450.0, 11.0, 0.01,
    ),
    model(
        "openai",
        "gpt-4o-mini",
        22,
        1200.0,
        128_000,
        250.0,
        0.0,
        true,
        320.0,
        6.0,
        0.005,
    ),
    model(
        "openai", "o3", 4, 3000.0, 200_000, 600.0, 2500.0, true, 1200.0, 14.0, 0.01,
    ),
    model(
        "openai",
        "text-embedding-3-small",
        8,
        350.0,
        8191,
        0.0,
        0.0,
        false,
        60.0,
        0.0,
        0.02,
    ),
    model(
        "anthropic",
        "claude-sonnet-4",
        14,
        2500.0,
        200_000,
        450.0,
        0.0,
        true,
        700.0,
        14.0,
        0.01,
    ),
    model(
        "anthropic",
        "claude-haiku",
        8,
        1500.0,
        200_000,
        300.0,
        0.0,
        true,
        380.0,
        6.0,
        0.005,
    ),
    model(
        "google",
        "gemini-2.5-pro",
        6,
        3000.0,
        1_000_000,
        500.0,
        1500.0,
        true,
        900.0,
        9.0,
        0.008,
    ),
    model(
        "google",
        "gemini-flash",
        10,
        1500.0,
        1_000_000,
        300.0,
        0.0,
        true,
        260.0,
        4.0,
        0.004,
    ),
    model(
        "mistral",
        "mistral-large",
        5,
        1500.0,
        128_000,
        350.0,
        0.0,
        false,
        480.0,
        13.0,
        0.01,
    ),
    model(
        "mistral",
        "mistral-small",
        3,
        900.0,
        32_000,
        250.0,
        0.0,
        false,
        260.0,
        6.0,
        0.005,
    ),
];

#[allow(clippy::too_many_arguments)]
const fn model(
    provider: &'static str,
    name: &'static str,
    weight: u32,
    input_median: f64,
    max_input: u64,
    output_median: f64,
    reasoning_median: f64,
    reports_cache: bool,
    first_token_ms: f64,
    ms_per_token: f64,
    ms_per_input_token: f64,
) -> Model {
    Model {
        provider,
        name,
        weight,
        input_median,
        max_input,
        output_median,
        reasoning_median,
        reports_cache,
        first_token_ms,
        ms_per_token,
        ms_per_input_token,
    }
}

/// An API route template and the shape of its traffic.
#[derive(Debug)]
pub(super) struct Route {
    pub method: &'static str,
    pub template: &'static str,
    pub weight: u32,
    pub ok_status: u16,
    pub latency_median_ms: f64,
    /// 0 for requests without a body.
    pub request_median_bytes: f64,
    pub response_median_bytes: f64,
}

const fn route(
    method: &'static str,
    template: &'static str,
    weight: u32,
    ok_status: u16,
    latency_median_ms: f64,
    request_median_bytes: f64,
    response_median_bytes: f64,
) -> Route {
    Route {
        method,
        template,
        weight,
        ok_status,
        latency_median_ms,
        request_median_bytes,
        response_median_bytes,
    }
}

pub(super) const ROUTES: &[Route] = &[
    route("POST", "/v1/chat", 28, 200, 850.0, 2500.0, 3000.0),
    route("POST", "/v1/completions", 8, 200, 600.0, 1800.0, 2200.0),
    route("POST", "/v1/embeddings", 15, 200, 45.0, 4000.0, 12_000.0),
    route("POST", "/v1/agents/{id}/runs", 9, 201, 180.0, 900.0, 600.0),
    route(
        "GET",
        "/v1/agents/{id}/runs/{run_id}",
        10,
        200,
        22.0,
        0.0,
        1800.0,
    ),
    route("GET", "/v1/agents", 4, 200, 18.0, 0.0, 2500.0),
    route("PUT", "/v1/agents/{id}", 2, 200, 40.0, 1200.0, 1200.0),
    route("GET", "/v1/models", 6, 200, 6.0, 0.0, 4000.0),
    route("GET", "/v1/usage", 4, 200, 110.0, 0.0, 6000.0),
    route("POST", "/v1/files", 3, 201, 380.0, 250_000.0, 300.0),
    route("GET", "/v1/files/{id}", 3, 200, 35.0, 0.0, 150_000.0),
    route("DELETE", "/v1/files/{id}", 1, 204, 25.0, 0.0, 0.0),
];

/// About 5% of requests; weights within the class.
pub(super) const CLIENT_ERRORS: &[(u16, u32)] = &[
    (400, 3),
    (401, 2),
    (403, 1),
    (404, 3),
    (409, 1),
    (413, 1),
    (422, 2),
    (429, 3),
];

/// About 1% of requests; weights within the class.
pub(super) const SERVER_ERRORS: &[(u16, u32)] = &[(500, 4), (502, 2), (503, 3), (504, 1)];

/// An AI agent and the shape of its runs.
#[derive(Debug)]
pub(super) struct Agent {
    pub name: &'static str,
    pub weight: u32,
    /// Median of the steps beyond the first.
    pub steps_median: f64,
    pub step_ms_median: f64,
    pub tools_per_step: f64,
    /// Whether it often hands sub-tasks to child runs.
    pub delegates: bool,
}

pub(super) const AGENTS: &[Agent] = &[
    Agent {
        name: "faq",
        weight: 40,
        steps_median: 2.0,
        step_ms_median: 1200.0,
        tools_per_step: 0.5,
        delegates: false,
    },
    Agent {
        name: "triage",
        weight: 25,
        steps_median: 3.0,
        step_ms_median: 1000.0,
        tools_per_step: 0.8,
        delegates: false,
    },
    Agent {
        name: "researcher",
        weight: 20,
        steps_median: 10.0,
        step_ms_median: 3500.0,
        tools_per_step: 1.2,
        delegates: true,
    },
    Agent {
        name: "coder",
        weight: 15,
        steps_median: 16.0,
        step_ms_median: 4500.0,
        tools_per_step: 1.0,
        delegates: true,
    },
];

pub(super) const RUN_STATUSES: &[(&str, u32)] = &[
    ("succeeded", 900),
    ("failed", 50),
    ("timeout", 30),
    ("cancelled", 20),
];

pub(super) const LLM_SOURCES: &[(&str, u32)] = &[
    ("support-bot", 30),
    ("chat-api", 30),
    ("search-service", 15),
    ("copilot", 15),
    ("batch-summarizer", 10),
];
pub(super) const API_SOURCES: &[(&str, u32)] = &[("api-gateway", 85), ("edge-proxy", 15)];
pub(super) const AGENT_SOURCES: &[(&str, u32)] = &[("agent-runtime", 80), ("workflow-engine", 20)];

/// Dimension keys, in the order they are written.
pub(super) const DIMENSION_KEYS: [&str; 5] =
    ["department", "environment", "agent", "region", "feature"];

pub(super) const DEPARTMENTS: &[(&str, u32)] = &[
    ("engineering", 30),
    ("customer_service", 25),
    ("sales", 15),
    ("marketing", 10),
    ("research", 10),
    ("finance", 5),
    ("legal", 5),
];
pub(super) const ENVIRONMENTS: &[(&str, u32)] =
    &[("production", 80), ("staging", 15), ("development", 5)];
pub(super) const FEATURES: &[(&str, u32)] = &[
    ("chat", 35),
    ("search", 20),
    ("summarize", 20),
    ("autocomplete", 15),
    ("classify", 10),
];
pub(super) const REGIONS: &[&str] = &[
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-southeast-1",
];

/// One of `items`, each as likely as its weight; `items` is never empty.
pub(super) fn pick<'a, T>(rng: &mut StdRng, items: &'a [T], weight: impl Fn(&T) -> u32) -> &'a T {
    let total: u32 = items.iter().map(&weight).sum();
    if total == 0 {
        return &items[0];
    }
    let mut x = rng.random_range(0..total);
    for item in items {
        let w = weight(item);
        if x < w {
            return item;
        }
        x -= w;
    }
    &items[items.len() - 1]
}
