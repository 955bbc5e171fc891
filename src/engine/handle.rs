//! The cloneable handle to the engine: submit requests, read stats, manage adapters.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::unbounded_channel;

use super::generate::check_common;
use super::types::*;
use super::EngineError;
use crate::model::{Llama, LoadedModel, ModelInfo, Tokenizer};

/// The cloneable handle to the engine.
#[derive(Clone)]
pub struct Engine {
    pub(super) tx: Sender<Command>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) max_queued: usize,
    pub(super) stats: Arc<Mutex<EngineStats>>,
    pub(super) model: Arc<Llama>,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) info: Arc<ModelInfo>,
}

impl Engine {
    /// Start an engine on `loaded`: the handle, and the worker thread behind it.
    pub fn start(loaded: LoadedModel, cfg: EngineConfig) -> Engine {
        let (tx, rx) = mpsc::channel();
        let engine = Engine {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued: cfg.max_queued,
            stats: Arc::new(Mutex::new(EngineStats::default())),
            model: Arc::new(loaded.model),
            tokenizer: Arc::new(loaded.tokenizer),
            info: Arc::new(loaded.info),
        };
        super::worker::spawn(&engine, rx, cfg);
        engine
    }

    /// Queue a request. Fails at once when the queue is full (`Overloaded`) or the request is
    /// invalid; everything else (unknown adapter, load failure) arrives as an `Error` event.
    pub fn submit(&self, req: EngineRequest) -> Result<EventStream, EngineError> {
        self.check(&req)?;
        // Reserve a queue slot, or refuse: memory stays bounded under any load.
        let mut cur = self.queued.load(Ordering::Acquire);
        loop {
            if cur >= self.max_queued {
                return Err(EngineError::Overloaded);
            }
            match self
                .queued
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        let (etx, erx) = unbounded_channel();
        if self.tx.send(Command::Submit(Box::new(req), etx)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::ShuttingDown);
        }
        Ok(EventStream { rx: erx })
    }

    fn check(&self, req: &EngineRequest) -> Result<(), EngineError> {
        let cfg = self.model.config();
        check_common(
            cfg.vocab_size,
            &req.prompt_token_ids,
            req.logprobs.max(req.prompt_logprobs),
            &req.sampling,
        )?;
        // Like OpenAI and vLLM: the whole request must fit, not be cut short at the context.
        if req.prompt_token_ids.len() + req.max_tokens.max(1) > cfg.max_context {
            return Err(EngineError::ContextLength {
                prompt: req.prompt_token_ids.len(),
                max_tokens: req.max_tokens,
                context: cfg.max_context,
            });
        }
        if req.stop_strings.iter().any(String::is_empty) {
            return Err(EngineError::InvalidRequest(
                "stop strings must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// Forget a loaded adapter (deleted or replaced in the store): running requests finish on
    /// the version they hold; new requests load the store's current version.
    pub fn invalidate_adapter(&self, name: &str) {
        let _ = self.tx.send(Command::Invalidate(name.to_string()));
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn model(&self) -> &Arc<Llama> {
        &self.model
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Stop the worker after the current step; in-flight requests get an error.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}
