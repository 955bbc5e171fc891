//! One validated request: `Engine::validate` is the only way to a `ValidRequest`, it names the
//! offending parameter structurally, and `Engine::submit` accepts nothing else.

use dora_serve::engine::{
    AdapterSpec, Engine, EngineError, EngineRequest, EventStream, LogprobsAsk, Param, ValidRequest,
    MAX_CHOICES, MAX_N, MAX_STOP,
};

use crate::web::*;

/// The signature is the check: a change that let `submit` take anything but a `ValidRequest`
/// does not compile.
#[test]
fn submit_accepts_only_a_valid_request() {
    let _: fn(&Engine, ValidRequest) -> Result<Vec<EventStream>, EngineError> = Engine::submit;
    let _: fn(&Engine, EngineRequest) -> Result<ValidRequest, EngineError> = Engine::validate;
}

fn param_of(e: &Engine, r: EngineRequest) -> Param {
    match e.validate(r) {
        Err(EngineError::InvalidRequest { param, msg }) => {
            assert!(!msg.is_empty());
            param
        }
        Err(other) => panic!("expected InvalidRequest, got {other}"),
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

#[test]
fn every_invalid_field_is_named() {
    let s = server();
    let e = &s.engine;
    let ok = || EngineRequest::new(vec![5, 6, 7], 4);
    assert!(e.validate(ok()).is_ok());
    let vocab = e.model().config().vocab_size as u32;
    let cases: Vec<(EngineRequest, Param)> = vec![
        (EngineRequest { n: 0, ..ok() }, Param::N),
        (
            EngineRequest {
                n: MAX_N + 1,
                ..ok()
            },
            Param::N,
        ),
        (
            EngineRequest {
                stop_strings: vec!["a".into(); MAX_STOP + 1],
                ..ok()
            },
            Param::Stop,
        ),
        (
            EngineRequest {
                stop_strings: vec![String::new()],
                ..ok()
            },
            Param::Stop,
        ),
        (
            EngineRequest {
                sampling: dora_serve::engine::SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                ..ok()
            },
            Param::Temperature,
        ),
        (
            EngineRequest {
                sampling: dora_serve::engine::SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                ..ok()
            },
            Param::TopP,
        ),
        (
            EngineRequest {
                logprobs: Some(LogprobsAsk {
                    top: 6,
                    param: Param::Logprobs,
                    limit: 5,
                }),
                ..ok()
            },
            Param::Logprobs,
        ),
        (
            EngineRequest {
                logprobs: Some(LogprobsAsk {
                    top: 21,
                    param: Param::TopLogprobs,
                    limit: 20,
                }),
                ..ok()
            },
            Param::TopLogprobs,
        ),
        (
            EngineRequest {
                prompts: vec![],
                ..ok()
            },
            Param::Prompt,
        ),
        (
            EngineRequest {
                prompts: vec![vec![]],
                ..ok()
            },
            Param::Prompt,
        ),
        (
            EngineRequest {
                prompts: vec![vec![vocab]],
                ..ok()
            },
            Param::Prompt,
        ),
        (
            EngineRequest {
                prompts: vec![vec![5]; MAX_CHOICES / 4 + 1],
                n: 4,
                ..ok()
            },
            Param::Prompt,
        ),
        (
            EngineRequest {
                model: Some("dora-all-r8".into()),
                adapter: Some(AdapterSpec::Named("lora-r8".into())),
                ..ok()
            },
            Param::Adapter,
        ),
        (
            EngineRequest {
                model: Some("no-such-model".into()),
                adapter: Some(AdapterSpec::Named("lora-r8".into())),
                ..ok()
            },
            Param::Model,
        ),
    ];
    for (i, (r, want)) in cases.into_iter().enumerate() {
        assert_eq!(param_of(e, r), want, "case {i}");
    }
    // What is not a field's value has its own error.
    let ctx = e.model().config().max_context;
    assert!(matches!(
        e.validate(EngineRequest::new(vec![5; 10], ctx)),
        Err(EngineError::ContextLength { .. })
    ));
    assert!(matches!(
        e.validate(EngineRequest {
            adapter: Some(AdapterSpec::Named("nope".into())),
            ..ok()
        }),
        Err(EngineError::AdapterNotFound(_))
    ));
    assert!(matches!(
        e.validate(EngineRequest {
            model: Some("nope".into()),
            ..ok()
        }),
        Err(EngineError::ModelNotFound(_))
    ));
    // `model` may name the base model or an adapter (vLLM style).
    let v = e
        .validate(EngineRequest {
            model: Some("dora-all-r8".into()),
            ..ok()
        })
        .unwrap();
    assert_eq!(v.adapter_name(), Some("dora-all-r8"));
    let v = e
        .validate(EngineRequest {
            model: Some(e.info().id.clone()),
            ..ok()
        })
        .unwrap();
    assert_eq!(v.adapter_name(), None);
}

/// The queue takes all of a request's choices or none of them.
#[test]
fn a_request_is_queued_whole_or_not_at_all() {
    let (s, gate) = gated_server((1, 3));
    let e = &s.engine;
    let four = EngineRequest {
        n: 4,
        ..EngineRequest::new(vec![5, 6], 2)
    };
    assert!(matches!(
        e.submit(e.validate(four).unwrap()),
        Err(EngineError::Overloaded)
    ));
    let three = EngineRequest {
        n: 3,
        ..EngineRequest::new(vec![5, 6], 2)
    };
    let streams = e.submit(e.validate(three).unwrap()).unwrap();
    assert_eq!(streams.len(), 3);
    gate.open();
    for mut st in streams {
        let mut tokens = 0;
        while let Some(ev) = st.blocking_next() {
            match ev {
                dora_serve::engine::Event::Token { .. } => tokens += 1,
                dora_serve::engine::Event::Done { .. } => break,
                dora_serve::engine::Event::Error(e) => panic!("{e}"),
                _ => {}
            }
        }
        assert_eq!(tokens, 2);
    }
}
