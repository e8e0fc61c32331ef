//! `/metrics` at 10,000 tenants: how long the usage families take to gather and encode as
//! Prometheus text, and how large the exposition is, with the default label limits. Beside it,
//! the plain baseline measured in the same run: the same events counted with a series for every
//! tenant (no folding), gathered and encoded the same way. Also the cost of counting an event
//! on the log writer's thread, in batches as the writer counts them.
//!
//! ```text
//! cargo bench -p meterd-ingest --bench metrics_render -- [--events N] [--tenants N] [--batch N]
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterd_ingest::metrics::{LabelLimits, UsageMetrics};
use meterd_schemas::{AgentRun, ApiRequest, Event, EventData, LlmUsage};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (not for anything but spreading the bench's events).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn events(n: usize, tenants: usize) -> Vec<Event> {
    let mut rng = Lcg(7);
    (0..n)
        .map(|i| {
            // A few big tenants and a long tail, as usage is.
            let t = ((rng.next().powi(3)) * tenants as f64) as usize;
            let tenant = format!("tenant-{t:05}");
            let base = Event {
                tenant,
                id: format!("e{i}"),
                time_us: 0,
                subject: None,
                source: None,
                dimensions: BTreeMap::new(),
                data: EventData::AgentRun(AgentRun {
                    agent: Some(format!("agent-{}", (rng.next() * 40.0) as usize)),
                    run_id: "r".to_owned(),
                    parent_run_id: None,
                    status: Some(["succeeded", "failed", "cancelled", "timeout"][i % 4].to_owned()),
                    duration_ms: 10,
                    steps: None,
                    tool_calls: None,
                }),
            };
            if i % 3 == 2 {
                Event {
                    data: EventData::ApiRequest(ApiRequest {
                        route: Some("/v1/chat".to_owned()),
                        method: Some("POST".to_owned()),
                        status_code: 200,
                        latency_ms: (rng.next() * 2_000.0) as i64,
                        request_bytes: None,
                        response_bytes: None,
                    }),
                    ..base
                }
            } else if i % 3 == 0 {
                Event {
                    data: EventData::LlmUsage(LlmUsage {
                        provider: ["openai", "anthropic", "google", "mistral"][i % 4].to_owned(),
                        model: format!("model-{}", (rng.next() * 40.0) as usize),
                        input_tokens: 1_000,
                        output_tokens: 100,
                        cached_input_tokens: Some(10),
                        cache_write_input_tokens: Some(5),
                        reasoning_tokens: None,
                        latency_ms: None,
                        status: None,
                        run_id: None,
                    }),
                    ..base
                }
            } else {
                base
            }
        })
        .collect()
}

fn render(registry: &Registry) -> String {
    let mut body = String::new();
    TextEncoder::new()
        .encode_utf8(&registry.gather(), &mut body)
        .expect("encode");
    body
}

fn median_render(registry: &Registry, rounds: usize) -> (Duration, usize, usize) {
    let mut times = Vec::with_capacity(rounds);
    let mut size = 0;
    let mut series = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let body = render(registry);
        times.push(t.elapsed());
        size = body.len();
        series = body.lines().filter(|l| !l.starts_with('#')).count();
    }
    times.sort();
    (times[times.len() / 2], size, series)
}

fn main() {
    let n = arg("--events", 1_000_000);
    let tenants = arg("--tenants", 10_000);
    let batch = arg("--batch", 1_000).max(1);
    let events = events(n, tenants);

    let registry = Registry::new();
    let usage = UsageMetrics::new(&registry, &LabelLimits::default()).expect("metrics");
    let t = Instant::now();
    for chunk in events.chunks(batch) {
        usage.accepted(chunk.iter());
    }
    let counting = t.elapsed();
    let (folded, folded_bytes, folded_series) = median_render(&registry, 51);

    // Baseline: a series per tenant, type; per tenant, provider, model, direction; per
    // tenant, agent, status: no folding.
    let plain = Registry::new();
    let ev = IntCounterVec::new(Opts::new("plain_events_total", "x"), &["tenant", "type"])
        .expect("family");
    let tok = IntCounterVec::new(
        Opts::new("plain_tokens_total", "x"),
        &["tenant", "provider", "model", "direction"],
    )
    .expect("family");
    let runs = IntCounterVec::new(
        Opts::new("plain_agent_runs_total", "x"),
        &["tenant", "agent", "status"],
    )
    .expect("family");
    for c in [&ev, &tok, &runs] {
        plain.register(Box::new(c.clone())).expect("register");
    }
    let latency = HistogramVec::new(
        HistogramOpts::new("plain_api_request_duration_seconds", "x"),
        &["tenant"],
    )
    .expect("family");
    plain.register(Box::new(latency.clone())).expect("register");
    let t = Instant::now();
    for e in &events {
        ev.with_label_values(&[&e.tenant, e.data.event_type().as_str()])
            .inc();
        match &e.data {
            EventData::LlmUsage(u) => {
                for (d, v) in [("input", u.input_tokens), ("output", u.output_tokens)] {
                    tok.with_label_values(&[&e.tenant, &u.provider, &u.model, d])
                        .inc_by(v as u64);
                }
            }
            EventData::AgentRun(r) => {
                runs.with_label_values(&[
                    &e.tenant,
                    r.agent.as_deref().unwrap_or(""),
                    r.status.as_deref().unwrap_or(""),
                ])
                .inc();
            }
            EventData::ApiRequest(a) => latency
                .with_label_values(&[&e.tenant])
                .observe(a.latency_ms as f64 / 1000.0),
        }
    }
    let plain_counting = t.elapsed();
    let (unfolded, unfolded_bytes, unfolded_series) = median_render(&plain, 11);

    println!(
        "{n} events over {tenants} tenants (40 models, 40 agents, 4 statuses), counted in batches of {batch}"
    );
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>16}",
        "", "series", "bytes", "render", "counting/event"
    );
    println!(
        "{:<34} {:>10} {:>12} {:>8.2}ms {:>14.0}ns",
        "usage families, default limits",
        folded_series,
        folded_bytes,
        folded.as_secs_f64() * 1e3,
        counting.as_nanos() as f64 / n as f64
    );
    println!(
        "{:<34} {:>10} {:>12} {:>8.2}ms {:>14.0}ns",
        "baseline: a series per value",
        unfolded_series,
        unfolded_bytes,
        unfolded.as_secs_f64() * 1e3,
        plain_counting.as_nanos() as f64 / n as f64
    );
}
