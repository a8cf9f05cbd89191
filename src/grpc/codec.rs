//! RoomService's codec: prost's, except for what a message that does not
//! decode means.
//!
//! tonic-prost answers a message that does not decode (bytes that are not
//! protobuf, a string that is not UTF-8) with INTERNAL, which says the server
//! failed. A request that does not decode is the client's error:
//! INVALID_ARGUMENT naming the field where decoding stopped
//! (`status::decode_error`). A response that does not decode (the generated
//! client uses this codec too) stays INTERNAL. `build.rs` makes the generated
//! code use [`RoomCodec`]. The routes that answer from encoded messages
//! (`grpc::routes`) use [`EncodedCodec`], which decodes the request the same
//! way and sends [`Encoded`] messages as they are.

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{BufMut as _, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
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

/// One message, encoded (without gRPC's length prefix).
#[derive(Debug, Clone)]
pub(super) struct Encoded(Bytes);

impl Encoded {
    pub(super) fn of(message: &impl Message) -> Encoded {
        Encoded(message.encode_to_vec().into())
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> &Bytes {
        &self.0
    }
}

/// One message as gRPC frames it on the wire: not compressed, its length
/// (4 bytes, big-endian), the message. Cloning it shares the bytes.
#[derive(Debug, Clone)]
pub(super) struct Framed(Bytes);

impl Framed {
    pub(super) fn of(message: &impl Message) -> Framed {
        let len = message.encoded_len();
        let mut framed = Vec::with_capacity(5 + len);
        framed.push(0);
        framed.extend_from_slice(
            &u32::try_from(len)
                .expect("a message under 4 GiB")
                .to_be_bytes(),
        );
        message
            .encode(&mut framed)
            .expect("a Vec grows to fit the message");
        Framed(framed.into())
    }

    pub(super) fn bytes(&self) -> &Bytes {
        &self.0
    }
}

/// The encoding buffer a unary reply starts with.
const ENCODED_BUFFER_BYTES: usize = 1024;

/// Sends [`Encoded`] messages (by copying them) and decodes a `U` request
/// (one that does not decode is INVALID_ARGUMENT, as for [`RoomCodec`]).
#[derive(Debug, Clone)]
pub(super) struct EncodedCodec<U>(PhantomData<U>);

impl<U> Default for EncodedCodec<U> {
    fn default() -> Self {
        EncodedCodec(PhantomData)
    }
}

impl<U> Codec for EncodedCodec<U>
where
    U: Message + Default + Decoded + Send + 'static,
{
    type Encode = Encoded;
    type Decode = U;
    type Encoder = EncodedEncoder;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> EncodedEncoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> MessageDecoder<U> {
        MessageDecoder::default()
    }
}

pub(super) struct EncodedEncoder;

impl Encoder for EncodedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item.0);
        Ok(())
    }

    /// Start at 1 KiB (a room is a few hundred bytes; it grows for a bigger
    /// one), not tonic's 8 KiB, a unary reply's needless allocation. Writes
    /// yield at tonic's usual 32 KiB.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(ENCODED_BUFFER_BYTES, 32 * 1024)
    }
}
