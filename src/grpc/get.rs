//! GetRoom served from encoded rooms (`grpc::routes` sends it here): a room
//! that memory answers with is converted and encoded once, by the first read
//! it answers, and kept on its row (`hot::HotRow`); every later read of it
//! sends those bytes. A changed row is a new row, so its encoding is new too.
//! A room read from IVS Chat is encoded for its one answer. The bytes on the
//! wire are the same: clients decode `proto::Room`.

use tonic::codegen::BoxFuture;
use tonic::server::UnaryService;
use tonic::{Request, Response, Status};

use crate::rooms::{Answer, Rooms};

use super::access::record_room;
use super::codec::Encoded;
use super::service::{cache_headers, caller};
use super::{convert, proto, to_status};

/// The GetRoom method, answering with an encoded room.
pub(super) struct GetRoom {
    pub(super) rooms: Rooms,
}

impl UnaryService<proto::GetRoomRequest> for GetRoom {
    type Response = Encoded;
    type Future = BoxFuture<Response<Encoded>, Status>;

    fn call(&mut self, request: Request<proto::GetRoomRequest>) -> Self::Future {
        let rooms = self.rooms.clone();
        Box::pin(async move { get_room(&rooms, request).await })
    }
}

async fn get_room(
    rooms: &Rooms,
    request: Request<proto::GetRoomRequest>,
) -> Result<Response<Encoded>, Status> {
    let caller = caller(&request);
    let req = request.into_inner();
    record_room(&req.identifier);
    let consistency = convert::consistency(req.consistency).map_err(to_status)?;
    let read = rooms.get(&req.identifier, consistency, caller).await;
    let mut reply = read
        .answer
        .map(|answer| Response::new(encoded(answer)))
        .map_err(to_status);
    if let Some(cache) = read.cache {
        match &mut reply {
            Ok(response) => cache_headers(response.metadata_mut(), cache),
            Err(status) => cache_headers(status.metadata_mut(), cache),
        }
    }
    reply
}

/// The room's encoding: a cached row's, made once and kept on the row.
fn encoded(answer: Answer) -> Encoded {
    let encode = |room| Encoded::of(&convert::room(room));
    match answer {
        Answer::Cached(row) => match row.derived(|row| encode(row.room.clone())) {
            Some(encoded) => encoded.clone(),
            None => encode(row.room.clone()),
        },
        Answer::Fetched(room) => encode(room),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use prost::Message as _;

    use super::*;
    use crate::domain::{Derived, Room, Timestamp};
    use crate::store::CachedRoom;

    pub(in crate::grpc) fn room(name: &str) -> Room {
        Room {
            arn: "arn:aws:ivschat:us-east-1:123456789012:room/abcdEFGH1234".into(),
            id: "abcdEFGH1234".into(),
            name: name.into(),
            create_time: Timestamp::from_nanos(1_700_000_000_000_000_000),
            update_time: Timestamp::from_nanos(1_700_000_001_000_000_000),
            maximum_message_rate_per_second: 10,
            maximum_message_length: 500,
            message_review_handler: None,
            tags: [("team".to_owned(), "chat".to_owned())].into(),
            logging_configuration_identifiers: vec![],
            details_pending: false,
        }
    }

    fn decoded(encoded: &Encoded) -> proto::Room {
        proto::Room::decode(encoded.bytes().clone()).expect("a Room")
    }

    #[test]
    fn a_cached_row_is_encoded_once_and_a_fetched_room_each_time() {
        let row = Arc::new(Derived::new(CachedRoom {
            room: room("v1"),
            validated_at: Timestamp::now(),
            deleted: false,
        }));
        let first = encoded(Answer::Cached(row.clone()));
        let again = encoded(Answer::Cached(row.clone()));
        assert_eq!(decoded(&first), convert::room(room("v1")));
        assert_eq!(
            first.bytes().as_ptr(),
            again.bytes().as_ptr(),
            "the second read sends the bytes the first one made"
        );

        // A changed room is a new row: its own encoding.
        let changed = Arc::new(Derived::new(CachedRoom {
            room: room("v2"),
            validated_at: Timestamp::now(),
            deleted: false,
        }));
        assert_eq!(decoded(&encoded(Answer::Cached(changed))).name, "v2");

        let fetched = encoded(Answer::Fetched(room("v3")));
        assert_eq!(decoded(&fetched), convert::room(room("v3")));
    }
}
