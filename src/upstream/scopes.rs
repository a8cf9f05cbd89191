//! The IVS Chats this service fronts: one scope per region, each with its SDK
//! client (signing for its region) and its budget (AWS's quotas are per
//! region). A call finds its scope from the room's ARN, or from the region a
//! request names.

use std::sync::Arc;

use super::client::{BudgetFor, Upstream, UpstreamSettings};
use crate::domain::{Error, Result, RoomArn};

/// Every region served, in `--regions`' order: the first is where a
/// CreateRoom that names no region goes. Cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    scopes: Arc<[Upstream]>,
}

impl Upstreams {
    /// `scopes`, one per region, the default first. Panics if empty or if a
    /// region is there twice (the server's wiring checks `--regions` first).
    pub fn new(scopes: Vec<Upstream>) -> Upstreams {
        assert!(!scopes.is_empty(), "at least one region is served");
        for (i, scope) in scopes.iter().enumerate() {
            assert!(
                scopes[..i].iter().all(|s| s.region() != scope.region()),
                "region {} is served twice",
                scope.region()
            );
        }
        Upstreams {
            scopes: scopes.into(),
        }
    }

    /// AWS in each of `regions` (the one region of aws-config's chain when
    /// empty), configured by aws-config's standard chain.
    /// `AWS_ENDPOINT_URL_IVSCHAT` / `AWS_ENDPOINT_URL` apply to every
    /// region; each client still signs for its own.
    pub async fn aws(
        settings: UpstreamSettings,
        regions: &[String],
        budget: BudgetFor<'_>,
    ) -> anyhow::Result<Upstreams> {
        Ok(Upstreams::new(
            Upstream::aws(settings, regions, budget).await?,
        ))
    }

    /// An IVS Chat at `endpoint_url` (the emulator) playing each of `regions`.
    pub fn at_endpoint(
        endpoint_url: &str,
        regions: &[String],
        settings: UpstreamSettings,
        budget: BudgetFor<'_>,
    ) -> Upstreams {
        Upstreams::new(
            regions
                .iter()
                .map(|region| {
                    Upstream::at_endpoint(endpoint_url, region, settings.clone(), budget(region))
                })
                .collect(),
        )
    }

    /// The scopes, the default first.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.scopes.iter()
    }

    /// The regions served, the default first.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().map(Upstream::region)
    }

    /// Where a CreateRoom that names no region goes.
    pub fn default_scope(&self) -> &Upstream {
        &self.scopes[0]
    }

    /// The scope of `region`; INVALID_ARGUMENT on `field` when not served.
    /// An empty name is the default region.
    pub fn of_region(&self, field: &str, region: &str) -> Result<&Upstream> {
        if region.is_empty() {
            return Ok(self.default_scope());
        }
        self.scopes
            .iter()
            .find(|s| s.region() == region)
            .ok_or_else(|| {
                Error::invalid(
                    field,
                    format!(
                        "region {region:?} is not served here; this service serves {}",
                        self.served()
                    ),
                )
            })
    }

    /// The scope of the region in `arn`; INVALID_ARGUMENT on `field` when
    /// not served (nothing is sent upstream).
    pub fn of_arn(&self, field: &str, arn: &RoomArn) -> Result<&Upstream> {
        self.scopes
            .iter()
            .find(|s| s.region() == arn.region())
            .ok_or_else(|| {
                Error::invalid(
                    field,
                    format!(
                        "the room is in region {}, which this service does not serve; it serves {}",
                        arn.region(),
                        self.served()
                    ),
                )
            })
    }

    /// The regions served, as a message names them.
    pub fn served(&self) -> String {
        self.regions().collect::<Vec<_>>().join(", ")
    }
}
