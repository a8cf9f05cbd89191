//! `ivschat.rooms.v1.RoomService` on top of [`Rooms`].

use std::pin::Pin;

use std::time::Duration;

use futures::Stream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::budget::Caller;
use crate::domain::Result;
use crate::rooms::{CacheInfo, Rooms};

use super::access::record_room;
use super::proto::room_service_server as server;
use super::{convert, proto, to_status};

/// The tonic service. Each method converts, calls [`Rooms`], converts back.
#[derive(Clone)]
pub struct RoomService {
    rooms: Rooms,
}

impl RoomService {
    pub fn new(rooms: Rooms) -> RoomService {
        RoomService { rooms }
    }
}

fn reply<T, U>(result: Result<T>, convert: impl FnOnce(T) -> U) -> Result<Response<U>, Status> {
    result.map(|t| Response::new(convert(t))).map_err(to_status)
}

/// The caller of a request, with the deadline its client set (gRPC's
/// `grpc-timeout`), for the upstream budget. The budget's deadline comes a
/// little earlier (a tenth of the time, at most 100 ms): a token that arrives
/// as the client gives up is wasted, and the client should hear
/// RESOURCE_EXHAUSTED rather than a bare timeout.
pub(super) fn caller<T>(request: &Request<T>) -> Caller {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(grpc_timeout);
    Caller::User {
        deadline: timeout.map(|t| {
            let margin = (t / 10).min(Duration::from_millis(100));
            tokio::time::Instant::now() + (t - margin)
        }),
    }
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The cache headers: `x-cache` (hit, miss or stale) and `x-cache-age` (seconds
/// since IVS Chat confirmed what the answer says, to the millisecond).
pub(super) fn cache_headers(metadata: &mut MetadataMap, cache: CacheInfo) {
    crate::telemetry::cache_read(cache.status.as_str());
    metadata.insert("x-cache", MetadataValue::from_static(cache.status.as_str()));
    let age = format!("{:.3}", cache.age.as_secs_f64());
    if let Ok(age) = MetadataValue::try_from(age) {
        metadata.insert("x-cache-age", age);
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchRoomsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl server::RoomService for RoomService {
    type WatchRoomsStream = WatchStream;

    /// Never called: the service as served (`grpc::routes`) sends
    /// WatchRooms to `grpc::watch`, which answers from encoded messages.
    async fn watch_rooms(
        &self,
        _request: Request<proto::WatchRoomsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        Err(Status::unimplemented(
            "WatchRooms is served by grpc::watch, not by the generated server",
        ))
    }

    async fn create_room(
        &self,
        request: Request<proto::CreateRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        let result = async {
            let request_id = (!req.request_id.is_empty()).then(|| req.request_id.clone());
            let region = req.region.clone();
            self.rooms
                .create(convert::new_room(req)?, &region, request_id, caller)
                .await
        };
        let result = result.await;
        if let Ok(room) = &result {
            record_room(&room.arn);
        }
        reply(result, convert::room)
    }

    /// Never called: the service as served (`grpc::routes`) sends GetRoom
    /// to `grpc::get`, which answers from encoded rooms.
    async fn get_room(
        &self,
        _request: Request<proto::GetRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        Err(Status::unimplemented(
            "GetRoom is served by grpc::get, not by the generated server",
        ))
    }

    async fn update_room(
        &self,
        request: Request<proto::UpdateRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        record_room(&req.identifier);
        let result = async {
            let expected = convert::expected_update_time(req.expected_update_time)?;
            let identifier = req.identifier.clone();
            self.rooms
                .update(&identifier, convert::room_patch(req)?, expected, caller)
                .await
        };
        reply(result.await, convert::room)
    }

    async fn delete_room(
        &self,
        request: Request<proto::DeleteRoomRequest>,
    ) -> Result<Response<proto::DeleteRoomResponse>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        record_room(&req.identifier);
        let result = async {
            let expected = convert::expected_update_time(req.expected_update_time)?;
            self.rooms.delete(&req.identifier, expected, caller).await
        };
        reply(result.await, |()| proto::DeleteRoomResponse {})
    }

    async fn list_rooms(
        &self,
        request: Request<proto::ListRoomsRequest>,
    ) -> Result<Response<proto::ListRoomsResponse>, Status> {
        let req = request.into_inner();
        let region = req.region.clone();
        let listing = self.rooms.list(convert::list_query(req), &region).await;
        let cache = listing.as_ref().ok().map(|l| l.cache);
        let mut reply = reply(listing, |listing| proto::ListRoomsResponse {
            rooms: listing.page.rooms.into_iter().map(convert::room).collect(),
            next_token: listing.page.next_token.unwrap_or_default(),
            revision: listing.revision,
        })?;
        if let Some(cache) = cache {
            cache_headers(reply.metadata_mut(), cache);
        }
        Ok(reply)
    }

    async fn tag_room(
        &self,
        request: Request<proto::TagRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        record_room(&req.identifier);
        let tags = req.tags.into_iter().collect();
        reply(
            self.rooms.tag(&req.identifier, tags, caller).await,
            convert::room,
        )
    }

    async fn untag_room(
        &self,
        request: Request<proto::UntagRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let caller = caller(&request);
        let req = request.into_inner();
        record_room(&req.identifier);
        reply(
            self.rooms
                .untag(&req.identifier, req.tag_keys, caller)
                .await,
            convert::room,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "100x", "123456789S", "-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }
}
