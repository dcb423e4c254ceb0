/* See filehash.h.  No Python API here: everything runs without the GIL. */
#include "filehash.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

static ssize_t read_some(int fd, char *buf, size_t size, int *error)
{
    for (;;) {
        ssize_t got = read(fd, buf, size);
        if (got >= 0 || errno != EINTR) {
            if (got < 0)
                *error = errno;
            return got;
        }
    }
}

int runner_hash_fd_serial(int fd, char *buf, size_t size, XXH3_state_t *state)
{
    int error = 0;
    ssize_t got;
    while ((got = read_some(fd, buf, size, &error)) > 0)
        XXH3_128bits_update(state, buf, (size_t)got);
    return error;
}

/* Two buffers handed back and forth: the reader fills buffer i while the hasher empties
   buffer i^1.  `len[i] > 0` means buffer i is full and waits for the hasher. */
typedef struct {
    int fd;
    char *buf[2];
    size_t size;
    ssize_t len[2];
    int ended;   /* the reader has stopped (end of file or error) */
    int error;
    pthread_mutex_t lock;
    pthread_cond_t changed;
} overlap_t;

static void *reader_main(void *arg)
{
    overlap_t *o = (overlap_t *)arg;
    int i = 0, error = 0;
    for (;;) {
        pthread_mutex_lock(&o->lock);
        while (o->len[i] > 0)
            pthread_cond_wait(&o->changed, &o->lock);
        pthread_mutex_unlock(&o->lock);
        ssize_t got = read_some(o->fd, o->buf[i], o->size, &error);
        pthread_mutex_lock(&o->lock);
        if (got > 0) {
            o->len[i] = got;
        } else {
            o->ended = 1;
            o->error = error;
        }
        pthread_cond_signal(&o->changed);
        pthread_mutex_unlock(&o->lock);
        if (got <= 0)
            return NULL;
        i ^= 1;
    }
}

int runner_hash_fd_overlapped(int fd, char *buf0, char *buf1, size_t size, XXH3_state_t *state)
{
    overlap_t o = {fd, {buf0, buf1}, size, {0, 0}, 0, 0,
                   PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
    pthread_t reader;
    int i = 0;
    if (pthread_create(&reader, NULL, reader_main, &o) != 0)
        return runner_hash_fd_serial(fd, buf0, size, state);
    for (;;) {
        pthread_mutex_lock(&o.lock);
        while (o.len[i] == 0 && !o.ended)
            pthread_cond_wait(&o.changed, &o.lock);
        ssize_t len = o.len[i];
        pthread_mutex_unlock(&o.lock);
        if (len == 0)
            break;  /* ended, and this buffer was never filled */
        XXH3_128bits_update(state, o.buf[i], (size_t)len);
        pthread_mutex_lock(&o.lock);
        o.len[i] = 0;
        pthread_cond_signal(&o.changed);
        pthread_mutex_unlock(&o.lock);
        i ^= 1;
    }
    pthread_join(reader, NULL);
    pthread_mutex_destroy(&o.lock);
    pthread_cond_destroy(&o.changed);
    return o.error;
}
