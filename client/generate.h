/* client/generate.h: `duet generate`, single-process generation on the CPU.
 *
 * Loads a GGUF model, tokenizes the prompt (through the model's chat template with
 * --chat), prefills it in chunks over the paged KV cache, samples, and prints the text
 * as it comes; then TTFT, prefill tokens/s and decode tokens/s on stderr. This is the
 * reference every serving mode must reproduce token for token.
 */
#ifndef DUET_CLIENT_GENERATE_H
#define DUET_CLIENT_GENERATE_H

/* The subcommand's main: argv[0] is "generate". Returns a process exit status. */
int generate_main(int argc, char **argv);

#endif
