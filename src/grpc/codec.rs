//! RoomService's codec: prost's, except for what a message that does not
//! decode means.
//!
//! tonic-prost answers a message that does not decode (bytes that are not
//! protobuf, a string that is not UTF-8) with INTERNAL, which says the server
//! failed. A request that does not decode is the client's error:
//! INVALID_ARGUMENT naming the field where decoding stopped
//! (`status::decode_error`). A response that does not decode (the generated
//! client uses this codec too) stays INTERNAL. `build.rs` makes the generated
//! code use [`RoomCodec`]; the WatchRooms route (`grpc::watch`) decodes its
//! request with [`MessageDecoder`].

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use super::{proto, status};

/// prost's encoding; decoding errors as [`Decoded`] says.
#[derive(Debug, Clone)]
pub struct RoomCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RoomCodec<T, U> {
    fn default() -> Self {
        RoomCodec(PhantomData)
    }
}

impl<T, U> Codec for RoomCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Decoded + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> MessageDecoder<U> {
        MessageDecoder::default()
    }
}

/// Decodes a `U`; a failure is `U::decode_error`.
#[derive(Debug, Clone)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U> Default for MessageDecoder<U> {
    fn default() -> Self {
        MessageDecoder(PhantomData)
    }
}

impl<U: Message + Default + Decoded> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| U::decode_error(&e))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// What it means when a message of this type does not decode. Every message
/// the service or its client decodes is listed below, as a request or a
/// response: a new one does not compile until it is.
pub trait Decoded {
    fn decode_error(error: &prost::DecodeError) -> Status;
}

macro_rules! decoded {
    ($decode_error:path => $($message:ident),+ $(,)?) => {$(
        impl Decoded for proto::$message {
            fn decode_error(error: &prost::DecodeError) -> Status {
                $decode_error(error)
            }
        }
    )+};
}

decoded!(status::decode_error =>
    CreateRoomRequest,
    GetRoomRequest,
    UpdateRoomRequest,
    DeleteRoomRequest,
    ListRoomsRequest,
    TagRoomRequest,
    UntagRoomRequest,
    WatchRoomsRequest,
);

decoded!(undecodable_response =>
    Room,
    DeleteRoomResponse,
    ListRoomsResponse,
    WatchRoomsResponse,
);

/// A response that does not decode: the server's fault, as tonic-prost has it.
fn undecodable_response(error: &prost::DecodeError) -> Status {
    Status::internal(error.to_string())
}
