//! The Arrow Flight front end.
//!
//! - **DoPut** `["<table>"]`: decodes the IPC messages (`PutDecoder`: string data stays in
//!   the received message, which the WAL keeps as it is when the batch needs no reshaping),
//!   hands each batch to the [`Ingest`](crate::pipeline::Ingest) pipeline (which waits while the
//!   memory budget is full, so this task stops reading and flow control pushes back on the
//!   client), and acks each batch, in order, with JSON `{"request_id","rows","wal_seq"}`
//!   once it is durable. A refused batch ends the call with its error after the acks of
//!   the batches before it.
//! - **DoAction** `register_table`, `get_table`, `list_tables`; **ListActions**.
//! - **DoGet** with a SQL ticket, **GetFlightInfo** with a SQL CMD descriptor (or a table
//!   path), **GetSchema**, **ListFlights** (one per table).

use std::pin::Pin;
use std::sync::Arc;

use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use flight_schema::{actions, PutAck};
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::pipeline::RawIpc;
use crate::state::AppState;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Batches a single DoPut may have submitted but not yet acknowledged.
const MAX_UNACKED_PER_STREAM: usize = 256;

pub struct FlightFrontEnd {
    state: Arc<AppState>,
}

impl FlightFrontEnd {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    async fn flight_info_for_sql(
        &self,
        sql: &str,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let schema = self.state.query.schema(sql.to_string()).await?;
        FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))
            .map(|info| {
                info.with_descriptor(descriptor)
                    .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(sql.to_string())))
            })
    }

    fn flight_info_for_table(&self, table: &str) -> Result<FlightInfo, Status> {
        let t = self
            .state
            .registry
            .get(table)
            .ok_or_else(|| Status::not_found(format!("table '{table}' is not registered")))?;
        let sql = format!("SELECT * FROM \"{table}\"");
        FlightInfo::new()
            .try_with_schema(&t.arrow_schema)
            .map_err(|e| Status::internal(e.to_string()))
            .map(|info| {
                info.with_descriptor(FlightDescriptor::new_path(vec![table.to_string()]))
                    .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(sql)))
            })
    }
}

/// The table named by a DoPut descriptor: PATH with exactly one element.
fn table_of(descriptor: Option<&FlightDescriptor>) -> Result<String, Status> {
    let d = descriptor.ok_or_else(|| {
        Status::invalid_argument(
            "DoPut: the first message must carry a FlightDescriptor PATH [\"<table>\"]",
        )
    })?;
    if d.r#type() != DescriptorType::Path || d.path.len() != 1 {
        return Err(Status::invalid_argument(format!(
            "DoPut: the descriptor must be a PATH with one element, the table name; got type {:?} with path {:?}",
            d.r#type(),
            d.path
        )));
    }
    Ok(d.path[0].clone())
}

fn json_result(value: &impl serde::Serialize) -> Result<arrow_flight::Result, Status> {
    let body = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(arrow_flight::Result { body: body.into() })
}

#[tonic::async_trait]
impl FlightService for FlightFrontEnd {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        // No authentication: answer an empty handshake so clients that always shake hands work.
        let out = futures::stream::once(async {
            Ok(HandshakeResponse {
                protocol_version: 0,
                payload: Default::default(),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let infos: Vec<Result<FlightInfo, Status>> = self
            .state
            .registry
            .list()
            .iter()
            .map(|t| self.flight_info_for_table(t.name()))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(infos))))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let d = request.into_inner();
        let info = match d.r#type() {
            DescriptorType::Cmd => {
                let sql = std::str::from_utf8(&d.cmd)
                    .map_err(|_| {
                        Status::invalid_argument("the CMD descriptor must hold UTF-8 SQL")
                    })?
                    .to_string();
                let span = tracing::info_span!("get_flight_info", protocol = "flight", sql = %sql);
                self.flight_info_for_sql(&sql, d).instrument(span).await?
            }
            DescriptorType::Path if d.path.len() == 1 => self.flight_info_for_table(&d.path[0])?,
            _ => {
                return Err(Status::invalid_argument(
                    "GetFlightInfo takes a CMD descriptor with SQL or a PATH [\"<table>\"]",
                ))
            }
        };
        Ok(Response::new(info))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "PollFlightInfo: use GetFlightInfo; queries are not long-running here",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let d = request.into_inner();
        let schema = match d.r#type() {
            DescriptorType::Path if d.path.len() == 1 => self
                .state
                .registry
                .get(&d.path[0])
                .ok_or_else(|| {
                    Status::not_found(format!("table '{}' is not registered", d.path[0]))
                })?
                .arrow_schema
                .clone(),
            DescriptorType::Cmd => {
                let sql = std::str::from_utf8(&d.cmd).map_err(|_| {
                    Status::invalid_argument("the CMD descriptor must hold UTF-8 SQL")
                })?;
                self.state.query.schema(sql.to_string()).await?
            }
            _ => {
                return Err(Status::invalid_argument(
                    "GetSchema takes a PATH [\"<table>\"] or a CMD with SQL",
                ))
            }
        };
        let result: SchemaResult = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let ticket = request.into_inner();
        let sql = std::str::from_utf8(&ticket.ticket)
            .map_err(|_| Status::invalid_argument("DoGet: the ticket must be UTF-8 SQL"))?
            .to_string();
        let span = tracing::info_span!("do_get", protocol = "flight", sql = %sql);
        let stream = self.state.query.run(sql).instrument(span).await?;
        let schema = stream.schema();
        // A failure while the result streams ends the call with its own status.
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(Status::from(e))));
        let out = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(|e| match e {
                FlightError::Tonic(s) => *s,
                other => Status::internal(other.to_string()),
            });
        Ok(Response::new(Box::pin(out)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let mut input = request.into_inner();
        let first = input.message().await?.ok_or_else(|| {
            Status::invalid_argument(
                "DoPut: empty stream; the first message must carry the descriptor and the schema",
            )
        })?;
        let table = table_of(first.flight_descriptor.as_ref())?;
        // Unknown tables fail before any data is read.
        self.state
            .ingest
            .check_table(&table)
            .await
            .map_err(Status::from)?;
        let span = tracing::info_span!("do_put", protocol = "flight", table = %table);

        let (ack_tx, ack_rx) = mpsc::channel::<Result<PutResult, Status>>(MAX_UNACKED_PER_STREAM);
        let (pending_tx, mut pending_rx) = mpsc::channel(MAX_UNACKED_PER_STREAM);

        // Acker: answers in submission order, each once durable.
        tokio::spawn(
            async move {
                while let Some(item) = pending_rx.recv().await {
                    let out = match item {
                        Ok((request_id, pending)) => {
                            let pending: crate::pipeline::PendingWrite = pending;
                            let rows = pending.rows;
                            match pending.durable().await {
                                Ok(wal_seq) => {
                                    let ack = PutAck {
                                        request_id,
                                        rows,
                                        wal_seq,
                                    };
                                    let meta = serde_json::to_vec(&ack).expect("ack serializes");
                                    Ok(PutResult {
                                        app_metadata: meta.into(),
                                    })
                                }
                                Err(e) => Err(Status::from(e)),
                            }
                        }
                        Err(status) => Err(status),
                    };
                    let stop = out.is_err();
                    if ack_tx.send(out).await.is_err() || stop {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );

        // Reader: decodes and submits; waits on the memory budget, which stops reading.
        let ingest = self.state.ingest.clone();
        tokio::spawn(
            async move {
                let mut messages = futures::stream::iter([Ok(first)]).chain(input);
                let mut decoder = PutDecoder::default();
                let mut request_id = 0u64;
                let mut rows = 0u64;
                while let Some(next) = messages.next().await {
                    let item = match next.map(|m| decoder.decode(m)) {
                        Ok(Ok(None)) => continue,
                        Ok(Ok(Some((batch, raw)))) => {
                            request_id += 1;
                            rows += batch.num_rows() as u64;
                            ingest
                                .submit(&table, batch, raw, "flight")
                                .await
                                .map(|p| (request_id, p))
                                .map_err(|e| {
                                    tracing::info!(request_id, error = %e, "batch refused");
                                    Status::from(e)
                                })
                        }
                        Err(s) => Err(Status::new(
                            s.code(),
                            format!("table '{table}': {}", s.message()),
                        )),
                        Ok(Err(e)) => Err(Status::invalid_argument(format!(
                            "table '{table}': cannot decode Flight data: {e}"
                        ))),
                    };
                    let stop = item.is_err();
                    if pending_tx.send(item).await.is_err() || stop {
                        break;
                    }
                }
                tracing::debug!(batches = request_id, rows, "DoPut input done");
            }
            .instrument(span),
        );

        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented(
            "DoExchange is not supported; use DoPut to write and DoGet to query",
        ))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let span = tracing::info_span!("do_action", protocol = "flight", action = %action.r#type);
        let _e = span.enter();
        let result = match action.r#type.as_str() {
            actions::REGISTER_TABLE => {
                let r = self
                    .state
                    .register_table(&action.body)
                    .await
                    .map_err(Status::from)?;
                json_result(&r)?
            }
            actions::GET_TABLE => {
                #[derive(serde::Deserialize)]
                struct Body {
                    name: String,
                }
                let b: Body = serde_json::from_slice(&action.body).map_err(|e| {
                    Status::invalid_argument(format!(
                        "get_table: body must be {{\"name\": \"<table>\"}}: {e}"
                    ))
                })?;
                json_result(&self.state.table_json(&b.name).map_err(Status::from)?)?
            }
            actions::LIST_TABLES => json_result(&self.state.tables_json())?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown action '{other}' (known: register_table, get_table, list_tables)"
                )))
            }
        };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(result)
        }))))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let list = [
            (actions::REGISTER_TABLE, "Register a table or a new version of it. Body: schema JSON with \"name\". Result: {\"name\",\"version\"}"),
            (actions::GET_TABLE, "Get a registered table. Body: {\"name\": \"<table>\"}. Result: schema JSON with \"version\""),
            (actions::LIST_TABLES, "List registered tables. Result: a JSON array of schemas"),
        ];
        let out = list.map(|(t, d)| {
            Ok(ActionType {
                r#type: t.to_string(),
                description: d.to_string(),
            })
        });
        Ok(Response::new(Box::pin(futures::stream::iter(out))))
    }
}

/// Decodes a DoPut stream: the schema message, dictionary batches, record batches.
///
/// Unlike arrow-flight's decoder, which copies a whole message body that is not 64-byte
/// aligned (tonic's are not), this lets the IPC reader copy only the fixed-width buffers
/// that are misaligned (offsets, numbers); string data stays in the received message,
/// which is also what the WAL writes (see [`RawIpc`]).
#[derive(Default)]
struct PutDecoder {
    schema: Option<arrow::datatypes::SchemaRef>,
    dictionaries: std::collections::HashMap<i64, arrow::array::ArrayRef>,
}

impl PutDecoder {
    /// The batch a message carries (with its raw message when it stands alone), or
    /// `None` for schema, dictionary and empty messages.
    fn decode(
        &mut self,
        m: FlightData,
    ) -> Result<Option<(arrow::record_batch::RecordBatch, Option<RawIpc>)>, String> {
        use arrow::ipc::MessageHeader;
        let message = arrow::ipc::root_as_message(&m.data_header)
            .map_err(|e| format!("not an Arrow IPC message: {e}"))?;
        match message.header_type() {
            MessageHeader::NONE => Ok(None),
            MessageHeader::Schema => {
                let schema = arrow::ipc::convert::try_schema_from_flatbuffer_bytes(&m.data_header)
                    .map_err(|e| format!("bad schema message: {e}"))?;
                self.schema = Some(Arc::new(schema));
                self.dictionaries.clear();
                Ok(None)
            }
            MessageHeader::DictionaryBatch => {
                let schema = self
                    .schema
                    .as_ref()
                    .ok_or("a dictionary batch came before the schema")?;
                let batch = message
                    .header_as_dictionary_batch()
                    .ok_or("bad dictionary batch message")?;
                arrow::ipc::reader::read_dictionary(
                    &arrow::buffer::Buffer::from(m.data_body),
                    batch,
                    schema,
                    &mut self.dictionaries,
                    &message.version(),
                )
                .map_err(|e| format!("bad dictionary batch: {e}"))?;
                Ok(None)
            }
            MessageHeader::RecordBatch => {
                let schema = self
                    .schema
                    .clone()
                    .ok_or("a record batch came before the schema")?;
                let rb = message
                    .header_as_record_batch()
                    .ok_or("bad record batch message")?;
                let body = arrow::buffer::Buffer::from(m.data_body.clone());
                let batch = arrow::ipc::reader::read_record_batch(
                    &body,
                    rb,
                    schema,
                    &self.dictionaries,
                    None,
                    &message.version(),
                )
                .map_err(|e| format!("bad record batch: {e}"))?;
                // The message stands alone unless a column refers to dictionaries sent in
                // other messages.
                let uses_dictionaries = self.schema.as_ref().is_some_and(|s| {
                    s.fields().iter().any(|f| {
                        matches!(f.data_type(), arrow::datatypes::DataType::Dictionary(..))
                    })
                });
                let raw = (!uses_dictionaries).then(|| RawIpc {
                    header: m.data_header,
                    body: m.data_body,
                });
                Ok(Some((batch, raw)))
            }
            other => Err(format!("unexpected IPC message type {other:?}")),
        }
    }
}
