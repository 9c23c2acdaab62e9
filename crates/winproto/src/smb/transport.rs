//! The TCP transport under our SMB connections.
//!
//! smb-rs 0.12's own TCP transport leaves Nagle's algorithm on and writes the
//! 4-byte direct-TCP header and each part of a message as separate writes.
//! A small request then waits for the peer's delayed ACK (40 ms on Linux)
//! before its second segment leaves: about 130 ms per operation on loopback.
//! This transport sets `TCP_NODELAY`, coalesces header and parts into one
//! buffer and writes it with one `write_all`, reads through a buffer, and
//! refuses frames larger than [`MAX_FRAME_BYTES`] instead of allocating
//! whatever length a peer announces.
//!
//! It plugs into smb-rs through `Connection::from_transport`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use smb_rs::transport::{SmbTransport, SmbTransportRead, SmbTransportWrite, TransportError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// Largest SMB2 frame accepted: 8 MiB of payload (Samba's and Windows'
/// largest max read size) plus headers.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024 + 64 * 1024;

const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Direct TCP (port 445) with `TCP_NODELAY` and one write per message.
pub struct NoDelayTcpTransport {
    remote: SocketAddr,
    reader: Option<BufReader<OwnedReadHalf>>,
    writer: Option<OwnedWriteHalf>,
}

impl NoDelayTcpTransport {
    /// Connects to `address` within `timeout`.
    pub async fn connect(address: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| Error::ConnectTimeout { address, timeout })?
            .map_err(|source| Error::Connect { address, source })?;
        stream.set_nodelay(true).map_err(|source| Error::Connect { address, source })?;
        let (read_half, write_half) = stream.into_split();
        Ok(NoDelayTcpTransport {
            remote: address,
            reader: Some(BufReader::with_capacity(READ_BUFFER_BYTES, read_half)),
            writer: Some(write_half),
        })
    }
}

impl SmbTransport for NoDelayTcpTransport {
    fn connect<'a>(
        &'a mut self,
        _server_name: &'a str,
        _address: SocketAddr,
    ) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        async { Err(TransportError::AlreadyConnected) }.boxed()
    }

    fn default_port(&self) -> u16 {
        445
    }

    fn split(
        mut self: Box<Self>,
    ) -> std::result::Result<(Box<dyn SmbTransportRead>, Box<dyn SmbTransportWrite>), TransportError> {
        let reader = self.reader.take().ok_or(TransportError::AlreadySplit)?;
        let writer = self.writer.take().ok_or(TransportError::AlreadySplit)?;
        Ok((Box::new(FrameReader { reader }), Box::new(FrameWriter { writer })))
    }

    fn remote_address(&self) -> std::result::Result<SocketAddr, TransportError> {
        Ok(self.remote)
    }
}

impl SmbTransportRead for NoDelayTcpTransport {
    fn receive_exact<'a>(
        &'a mut self,
        out_buf: &'a mut [u8],
    ) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        async move {
            let reader = self.reader.as_mut().ok_or(TransportError::NotConnected)?;
            reader.read_exact(out_buf).await?;
            Ok(())
        }
        .boxed()
    }

    fn receive<'a>(&'a mut self) -> BoxFuture<'a, std::result::Result<Vec<u8>, TransportError>> {
        async move {
            let reader = self.reader.as_mut().ok_or(TransportError::NotConnected)?;
            receive_frame(reader).await
        }
        .boxed()
    }
}

impl SmbTransportWrite for NoDelayTcpTransport {
    fn send_raw<'a>(&'a mut self, buf: &'a [u8]) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        async move {
            let writer = self.writer.as_mut().ok_or(TransportError::NotConnected)?;
            writer.write_all(buf).await?;
            Ok(())
        }
        .boxed()
    }

    fn send<'a>(
        &'a mut self,
        data: &'a smb_rs::transport::IoVec,
    ) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        async move {
            let writer = self.writer.as_mut().ok_or(TransportError::NotConnected)?;
            send_frame(writer, data).await
        }
        .boxed()
    }
}

struct FrameReader {
    reader: BufReader<OwnedReadHalf>,
}

impl SmbTransportRead for FrameReader {
    fn receive_exact<'a>(
        &'a mut self,
        out_buf: &'a mut [u8],
    ) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        async move {
            self.reader.read_exact(out_buf).await?;
            Ok(())
        }
        .boxed()
    }

    fn receive<'a>(&'a mut self) -> BoxFuture<'a, std::result::Result<Vec<u8>, TransportError>> {
        receive_frame(&mut self.reader).boxed()
    }
}

struct FrameWriter {
    writer: OwnedWriteHalf,
}

impl SmbTransportWrite for FrameWriter {
    fn send_raw<'a>(&'a mut self, buf: &'a [u8]) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        async move {
            self.writer.write_all(buf).await?;
            Ok(())
        }
        .boxed()
    }

    fn send<'a>(
        &'a mut self,
        data: &'a smb_rs::transport::IoVec,
    ) -> BoxFuture<'a, std::result::Result<(), TransportError>> {
        send_frame(&mut self.writer, data).boxed()
    }
}

/// Header and all parts in one buffer, one `write_all`.
async fn send_frame(
    writer: &mut OwnedWriteHalf,
    data: &smb_rs::transport::IoVec,
) -> std::result::Result<(), TransportError> {
    let length = data.total_size();
    if length > 0x00FF_FFFF {
        return Err(TransportError::InvalidMessage);
    }
    let mut frame = Vec::with_capacity(4 + length);
    frame.push(0);
    frame.extend_from_slice(&(length as u32).to_be_bytes()[1..]);
    for part in data.iter() {
        frame.extend_from_slice(part);
    }
    writer.write_all(&frame).await?;
    Ok(())
}

/// One direct-TCP frame: a zero byte, a 24-bit big-endian length, the
/// message. Lengths above [`MAX_FRAME_BYTES`] are refused before allocating.
async fn receive_frame(reader: &mut BufReader<OwnedReadHalf>) -> std::result::Result<Vec<u8>, TransportError> {
    let mut header = [0u8; 4];
    reader.read_exact(&mut header).await?;
    if header[0] != 0 {
        return Err(TransportError::InvalidMessage);
    }
    let length = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(TransportError::InvalidMessage);
    }
    let mut message = vec![0u8; length];
    reader.read_exact(&mut message).await?;
    Ok(message)
}
