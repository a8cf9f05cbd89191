//! `ivschat.rooms.v1.RoomService` on top of [`Rooms`].

use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use crate::domain::{Error, Result};
use crate::feed::Feed;
use crate::rooms::Rooms;

use super::proto::room_service_server as server;
use super::{convert, proto, to_status};

/// The tonic service. Each method converts, calls [`Rooms`], converts back.
#[derive(Clone)]
pub struct RoomService {
    rooms: Rooms,
    feed: Feed,
}

impl RoomService {
    pub fn new(rooms: Rooms, feed: Feed) -> RoomService {
        RoomService { rooms, feed }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> server::RoomServiceServer<RoomService> {
        server::RoomServiceServer::new(self)
    }
}

/// Fields the contract names for later versions: refused, never ignored.
fn reserved(field: &str, set: bool) -> Result<()> {
    if set {
        Err(Error::Unimplemented(format!(
            "{field} is reserved for a later version of this service and must not be set yet"
        )))
    } else {
        Ok(())
    }
}

fn reply<T, U>(result: Result<T>, convert: impl FnOnce(T) -> U) -> Result<Response<U>, Status> {
    result.map(|t| Response::new(convert(t))).map_err(to_status)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchRoomsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl server::RoomService for RoomService {
    type WatchRoomsStream = WatchStream;

    async fn watch_rooms(
        &self,
        request: Request<proto::WatchRoomsRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let result = async {
            let request = convert::watch_request(request.into_inner())?;
            self.feed.watch(request).await
        };
        reply(result.await, |items| {
            Box::pin(items.map(|item| item.map(convert::watch_item).map_err(to_status)))
                as WatchStream
        })
    }

    async fn create_room(
        &self,
        request: Request<proto::CreateRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let req = request.into_inner();
        let result = async {
            reserved("request_id", !req.request_id.is_empty())?;
            self.rooms.create(convert::new_room(req)?).await
        };
        reply(result.await, convert::room)
    }

    async fn get_room(
        &self,
        request: Request<proto::GetRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let req = request.into_inner();
        let result = async {
            let consistency = convert::consistency(req.consistency)?;
            self.rooms.get(&req.identifier, consistency).await
        };
        reply(result.await, convert::room)
    }

    async fn update_room(
        &self,
        request: Request<proto::UpdateRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let req = request.into_inner();
        let result = async {
            reserved("expected_update_time", req.expected_update_time.is_some())?;
            let identifier = req.identifier.clone();
            self.rooms
                .update(&identifier, convert::room_patch(req)?)
                .await
        };
        reply(result.await, convert::room)
    }

    async fn delete_room(
        &self,
        request: Request<proto::DeleteRoomRequest>,
    ) -> Result<Response<proto::DeleteRoomResponse>, Status> {
        let req = request.into_inner();
        reply(self.rooms.delete(&req.identifier).await, |()| {
            proto::DeleteRoomResponse {}
        })
    }

    async fn list_rooms(
        &self,
        request: Request<proto::ListRoomsRequest>,
    ) -> Result<Response<proto::ListRoomsResponse>, Status> {
        let query = convert::list_query(request.into_inner());
        reply(self.rooms.list(query).await, |(page, revision)| {
            proto::ListRoomsResponse {
                rooms: page.rooms.into_iter().map(convert::room).collect(),
                next_token: page.next_token.unwrap_or_default(),
                revision,
            }
        })
    }

    async fn tag_room(
        &self,
        request: Request<proto::TagRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let req = request.into_inner();
        let tags = req.tags.into_iter().collect();
        reply(self.rooms.tag(&req.identifier, tags).await, convert::room)
    }

    async fn untag_room(
        &self,
        request: Request<proto::UntagRoomRequest>,
    ) -> Result<Response<proto::Room>, Status> {
        let req = request.into_inner();
        reply(
            self.rooms.untag(&req.identifier, req.tag_keys).await,
            convert::room,
        )
    }
}
