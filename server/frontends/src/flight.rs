//! The Arrow Flight front end.
//!
//! - **DoPut** `["<table>"]`: decodes the IPC messages (`PutDecoder`: string data stays in
//!   the received message, which the WAL keeps as it is when the batch needs no reshaping),
//!   hands each batch to the [`Ingest`](sluice_ingest::Ingest) pipeline (which waits while the
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
use flight_schema::decode::PutDecoder;
use flight_schema::{actions, PutAck};
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::edge::status;
use crate::state::AppState;
use sluice_core::error::Error;
use sluice_ingest::{MemoryWait, RawIpc};

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
        let schema = self
            .state
            .query
            .schema(sql.to_string())
            .await
            .map_err(status)?;
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

/// tonic reports a message it cannot decode (e.g. a path that is not UTF-8) as INTERNAL:
/// it is the client's message that is wrong.
pub fn decode_status(s: Status) -> Status {
    if s.code() == tonic::Code::Internal && s.message().starts_with("failed to decode") {
        Status::invalid_argument(format!("malformed request: {}", s.message()))
    } else {
        s
    }
}

/// Spawns `task`; if it panics, `report` gets an INTERNAL status naming `what`, so the
/// call ends with an error rather than with OK and missing acks.
fn spawn_caught<T: Send + 'static>(
    what: &'static str,
    report: mpsc::Sender<Result<T, Status>>,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
            let message = sluice_core::error::panic_message(&*panic);
            tracing::error!(what, %message, "a request task panicked");
            let _ = report
                .send(Err(Status::internal(format!("{what} failed: {message}"))))
                .await;
        }
    });
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
                self.state
                    .query
                    .schema(sql.to_string())
                    .await
                    .map_err(status)?
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
        let stream = self
            .state
            .query
            .run(sql)
            .instrument(span)
            .await
            .map_err(status)?;
        let schema = stream.schema();
        // A failure while the result streams ends the call with its own status.
        let batches = stream.map_err(|e| FlightError::Tonic(Box::new(status(e))));
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
        let first = input
            .message()
            .await
            .map_err(decode_status)?
            .ok_or_else(|| {
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
            .map_err(status)?;
        let span = tracing::info_span!("do_put", protocol = "flight", table = %table);

        let (ack_tx, ack_rx) = mpsc::channel::<Result<PutResult, Status>>(MAX_UNACKED_PER_STREAM);
        let (pending_tx, mut pending_rx) = mpsc::channel(MAX_UNACKED_PER_STREAM);

        // Acker: answers in submission order, each once durable.
        let panic_tx = ack_tx.clone();
        spawn_caught(
            "DoPut acks",
            panic_tx,
            async move {
                while let Some(item) = pending_rx.recv().await {
                    let out = match item {
                        Ok((request_id, pending)) => {
                            let pending: sluice_ingest::PendingWrite = pending;
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
                                Err(e) => Err(status(e)),
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
        let panic_tx = pending_tx.clone();
        spawn_caught(
            "DoPut input",
            panic_tx,
            async move {
                let mut messages = futures::stream::iter([Ok(first)]).chain(input);
                let mut decoder = PutDecoder::default();
                let mut request_id = 0u64;
                let mut rows = 0u64;
                while let Some(next) = messages.next().await {
                    let next = next.map_err(decode_status).map(|m| {
                        decoder.decode(m.data_header, m.data_body).map(|d| {
                            d.map(|d| {
                                let raw = d.raw.map(|(header, body)| RawIpc { header, body });
                                (d.batch, raw)
                            })
                        })
                    });
                    let item = match next {
                        Ok(Ok(None)) => continue,
                        Ok(Ok(Some((batch, raw)))) => {
                            request_id += 1;
                            rows += batch.num_rows() as u64;
                            ingest
                                .submit(&table, batch, raw, "flight", MemoryWait::Forever)
                                .await
                                .map(|p| (request_id, p))
                                .map_err(|e| {
                                    tracing::info!(request_id, error = %e, "batch refused");
                                    status(e)
                                })
                        }
                        Err(s) => Err(Status::new(
                            s.code(),
                            format!("table '{table}': {}", s.message()),
                        )),
                        Ok(Err(e)) => Err(status(
                            Error::from(e)
                                .context(&format!("table '{table}': cannot decode Flight data")),
                        )),
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
                    .map_err(status)?;
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
                json_result(&self.state.table_json(&b.name).map_err(status)?)?
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
