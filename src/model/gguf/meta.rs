//! Typed reads of a GGUF file's metadata, each error naming the file and the key.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use crate::model::ModelError;

pub(super) struct Meta<'a> {
    pub(super) md: &'a HashMap<String, Value>,
    pub(super) path: &'a Path,
}

impl Meta<'_> {
    pub(super) fn err(&self, msg: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }

    pub(super) fn usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key)
            .map(|v| {
                v.to_u64()
                    .or_else(|_| v.to_u32().map(u64::from))
                    .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                    .map(|x| x as usize)
                    .map_err(|e| self.err(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    pub(super) fn req_usize(&self, key: &str) -> Result<usize, ModelError> {
        self.usize(key)?
            .ok_or_else(|| self.err(format!("metadata {key} is missing")))
    }

    pub(super) fn f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key)
            .map(|v| {
                v.to_f32()
                    .map(f64::from)
                    .or_else(|_| v.to_f64())
                    .map_err(|e| self.err(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<String>, ModelError> {
        self.get(key)
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| self.err(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    pub(super) fn u32(&self, key: &str) -> Result<Option<u32>, ModelError> {
        Ok(self.usize(key)?.map(|v| v as u32))
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|v| {
                v.to_bool()
                    .map_err(|e| self.err(format!("metadata {key}: {e}")))
            })
            .transpose()
    }

    pub(super) fn strings(&self, key: &str) -> Result<Vec<String>, ModelError> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(format!("metadata {key} is missing")))?;
        v.to_vec()
            .map_err(|e| self.err(format!("metadata {key}: {e}")))?
            .iter()
            .map(|s| {
                s.to_string()
                    .cloned()
                    .map_err(|e| self.err(format!("metadata {key}: {e}")))
            })
            .collect()
    }

    pub(super) fn ints(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let list = v
            .to_vec()
            .map_err(|e| self.err(format!("metadata {key}: {e}")))?;
        list.iter()
            .map(|x| {
                x.to_i32()
                    .map(i64::from)
                    .or_else(|_| x.to_u32().map(i64::from))
                    .or_else(|_| x.to_i64())
                    .map_err(|e| self.err(format!("metadata {key}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
