//! Meters as validated at startup.

use meterd_schemas::EventType;
use meterd_schemas::columns::{Column, Kind};
use serde::Serialize;

use crate::config::{Aggregation, MeterConfig};
use crate::filter::{Filter, filter_column};

/// A named aggregation over the events of one type.
#[derive(Debug, Clone)]
pub struct Meter {
    pub name: String,
    pub event_type: EventType,
    pub aggregation: Aggregation,
    pub field: Option<&'static Column>,
    pub filter: Option<Filter>,
    pub group_by: Vec<&'static Column>,
    pub description: Option<String>,
}

/// The event type named `name` in a configuration entry; the error lists the types.
pub fn event_type(name: &str) -> Result<EventType, String> {
    EventType::parse(name).ok_or_else(|| {
        format!(
            "type {name:?} is not an event type ({})",
            EventType::ALL.map(EventType::as_str).join(", ")
        )
    })
}

impl Meter {
    /// Checks one `[[meters]]` entry; the error says what is wrong with it.
    pub fn new(config: &MeterConfig) -> Result<Meter, String> {
        let event_type = event_type(&config.event_type)?;
        let field = match (&config.field, config.aggregation) {
            (None, Aggregation::Count) => None,
            (Some(_), Aggregation::Count) => {
                return Err("a count takes no field".to_owned());
            }
            (None, other) => {
                return Err(format!("a {} needs a field", other.as_str()));
            }
            (Some(name), aggregation) => {
                let column = filter_column(name).map_err(|e| format!("field: {e}"))?;
                if aggregation != Aggregation::UniqueCount && column.kind != Kind::Int {
                    return Err(format!(
                        "field: a {} needs an integer column, and {:?} is text",
                        aggregation.as_str(),
                        column.name
                    ));
                }
                Some(column)
            }
        };
        let filter = config
            .filter
            .as_deref()
            .map(Filter::parse)
            .transpose()
            .map_err(|e| format!("filter: {e}"))?;
        let group_by = config
            .group_by
            .iter()
            .map(|name| filter_column(name).map_err(|e| format!("group_by: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Meter {
            name: config.name.clone(),
            event_type,
            aggregation: config.aggregation,
            field,
            filter,
            group_by,
            description: config.description.clone(),
        })
    }

    /// How `GET /v1/meters` shows the meter.
    pub fn describe(&self) -> MeterView {
        MeterView {
            name: self.name.clone(),
            event_type: self.event_type.as_str(),
            aggregation: self.aggregation.as_str(),
            field: self.field.map(|c| c.name),
            filter: self.filter.as_ref().map(ToString::to_string),
            group_by: self.group_by.iter().map(|c| c.name).collect(),
            description: self.description.clone(),
        }
    }
}

/// A meter as `GET /v1/meters` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct MeterView {
    pub name: String,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    pub aggregation: &'static str,
    pub field: Option<&'static str>,
    pub filter: Option<String>,
    pub group_by: Vec<&'static str>,
    pub description: Option<String>,
}
