//! Who is calling: the identity an API key resolves to, shared by ingest and query so both
//! apply the same tenant binding.

/// The caller behind a request, attached by the server's authentication layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The API key's name (never the key itself); used in logs.
    pub key_name: String,
    /// The tenant the key is bound to, if any: such a key may only send and see that tenant.
    pub tenant: Option<String>,
}
