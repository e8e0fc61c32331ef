//! The contracts every other meterd crate shares: the v1 usage event, the rules that decide
//! whether an event is accepted (each rejection names the field and the reason), the flattened
//! Arrow schema of the `events` table, and the JSON Schema producers can validate against.
//!
//! Nothing here does I/O; ingest, query and the stores all build on these types so that a field
//! means the same thing everywhere.

pub mod arrow_schema;
pub mod auth;
pub mod cloudevents;
pub mod columns;
pub mod event;
pub mod frozen;
pub mod json_schema;
pub mod validate;

pub use arrow_schema::{EventsBatchBuilder, EventsSnapshot, SnapshotPin, events_schema};
pub use auth::Principal;
pub use cloudevents::validate_cloudevent;
pub use event::{AgentRun, ApiRequest, Event, EventData, EventType, LlmUsage, StoredEvent};
pub use validate::{FieldError, Limits, ValidationContext, validate_event};
